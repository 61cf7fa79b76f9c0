"""A CPU kernel for decode attention over the paged pool: each row's one query attends over its keys where
they lie in the pool, block by block through its unit table, without gathering them first.

The portable path (kv_cache.py `_attend_blocks`) copies a row's blocks into one contiguous (S, nh, hs)
tensor per layer application and calls SDPA: on this CPU that copy cost as much as all the step's matrix
products at batch 32 (29% of a step, docs/BENCHMARKS.md part 8). This kernel reads each key and value
once. It is C++ built at first use with torch.utils.cpp_extension (cached under
~/.cache/torch_extensions; about a minute the first time); without a compiler, or with
MESH_PAGED_KERNEL=0, `load()` returns None and the portable path runs.

    out = kernel.decode(q (n, T, nh, hs) float32, k_pool, v_pool (U, bs, nh, hs) float32|bfloat16,
                        units (n, nb) int64, lengths (n, T) int64, scale)  ->  (n, T, nh, hs) float32

Query t of row i attends over the row's first lengths[i, t] positions (its K/V already in the pool):
position p is offset p % bs of unit units[i, p // bs]. T is 1 for a decode step, g for a verify pass.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("mesh.engine")

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

template <typename T>
static void rows(const float* q, const T* kp, const T* vp, const int64_t* units, const int64_t* lengths, float* out,
                 int64_t n, int64_t nq, int64_t nh, int64_t hs, int64_t bs, int64_t nb, float scale) {
  at::parallel_for(0, n * nq * nh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score;
    std::vector<float> acc(hs);
    for (int64_t r = begin; r < end; ++r) {  // r = (row i, query j, head h)
      const int64_t i = r / (nq * nh), h = r % nh, len = lengths[r / nh];
      const float* qi = q + r * hs;
      score.resize(len);
      float m = -INFINITY;
      for (int64_t t = 0; t < len; ++t) {  // q . k for every visible key
        const T* k = kp + ((units[i * nb + t / bs] * bs + t % bs) * nh + h) * hs;
        float s = 0.f;
        for (int64_t d = 0; d < hs; ++d) s += qi[d] * static_cast<float>(k[d]);
        score[t] = s * scale;
        m = std::max(m, score[t]);
      }
      float sum = 0.f;
      for (int64_t d = 0; d < hs; ++d) acc[d] = 0.f;
      for (int64_t t = 0; t < len; ++t) {  // softmax-weighted sum of the values
        const float p = std::exp(score[t] - m);
        sum += p;
        const T* v = vp + ((units[i * nb + t / bs] * bs + t % bs) * nh + h) * hs;
        for (int64_t d = 0; d < hs; ++d) acc[d] += p * static_cast<float>(v[d]);
      }
      float* o = out + r * hs;
      const float inv = len > 0 ? 1.f / sum : 0.f;
      for (int64_t d = 0; d < hs; ++d) o[d] = acc[d] * inv;
    }
  });
}

torch::Tensor decode(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor units,
                     torch::Tensor lengths, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous() && q.dim() == 4, "q: contiguous float32 (n, T, nh, hs)");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.dim() == 4, "pools: contiguous (U, bs, nh, hs)");
  TORCH_CHECK(units.dtype() == torch::kInt64 && units.is_contiguous() && lengths.dtype() == torch::kInt64, "int64 tables");
  const int64_t n = q.size(0), nq = q.size(1), nh = q.size(2), hs = q.size(3), bs = k_pool.size(1), nb = units.size(1);
  TORCH_CHECK(lengths.is_contiguous() && lengths.numel() == n * nq && units.size(0) == n, "lengths (n, T), units (n, nb)");
  auto out = torch::empty_like(q);
  if (k_pool.scalar_type() == torch::kBFloat16) {
    rows<at::BFloat16>(q.data_ptr<float>(), k_pool.data_ptr<at::BFloat16>(), v_pool.data_ptr<at::BFloat16>(),
                       units.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), out.data_ptr<float>(), n, nq, nh, hs, bs, nb, scale);
  } else {
    TORCH_CHECK(k_pool.scalar_type() == torch::kFloat32, "pools: float32 or bfloat16");
    rows<float>(q.data_ptr<float>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>(),
                units.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), out.data_ptr<float>(), n, nq, nh, hs, bs, nb, scale);
  }
  return out;
}
"""

_lock = threading.Lock()
_state: dict = {}


def load():
    """The built kernel module (with .decode), or None where it cannot be built or is switched off."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def _build():
    if os.environ.get("MESH_PAGED_KERNEL", "1").strip() in ("0", "false", "no"):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(name="mesh_paged_attention_v2", cpp_sources=SOURCE, functions=["decode"],
                             extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"], verbose=False)
    except Exception as exc:  # no compiler, no headers: the portable path serves
        log.warning("paged attention kernel not built (%s): gathering blocks instead",
                    f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
        return None
    return module
