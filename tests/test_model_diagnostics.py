"""The paper's hidden-state probes on inputs with known answers, then on a real (tiny) model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model import MeshConfig, MeshForCausalLM
from model.diagnostics import (
    effective_rank,
    probe_hidden_states,
    probe_model,
    rbf_cka,
    relative_update_magnitude,
    singular_spectrum,
)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_update_magnitude_known_values():
    h = randn(10, 8)
    assert relative_update_magnitude(h, h) == 0  # identity block
    assert math.isclose(relative_update_magnitude(h, 3 * h), 1.0)  # 2 * 2|h| / (3|h| + |h|)
    assert math.isclose(relative_update_magnitude(h, -h), 2.0)  # the largest possible
    assert math.isclose(relative_update_magnitude(h, torch.zeros_like(h)), 2.0)


def test_cka_known_values():
    x = randn(40, 16)
    assert math.isclose(rbf_cka(x, x), 1.0, rel_tol=1e-9)
    q, _ = torch.linalg.qr(randn(16, 16, seed=1))
    # The median-distance bandwidth makes RBF CKA invariant to rotation, isotropic scale and shift.
    assert math.isclose(rbf_cka(x, 5 * x @ q + 2), 1.0, rel_tol=1e-9)
    y = randn(40, 3, seed=2)
    assert math.isclose(rbf_cka(x, y), rbf_cka(y, x), rel_tol=1e-12)
    assert rbf_cka(x, y) < 0.6  # unrelated representations
    assert rbf_cka(x, x[torch.randperm(40, generator=torch.Generator().manual_seed(3))]) < 0.6
    with pytest.raises(ValueError, match="same points"):
        rbf_cka(x, x[:5])


def test_spectrum_known_values():
    u, _ = torch.linalg.qr(randn(12, 4, seed=4))
    v, _ = torch.linalg.qr(randn(6, 4, seed=5))
    s = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    x = u @ torch.diag(s) @ v.T  # (12, 6) with singular values 8, 4, 2, 1, 0, 0
    spec = singular_spectrum(x)
    assert spec.shape == (6,)
    assert torch.allclose(spec[:4], s / 8) and spec[4:].abs().max() < 1e-12
    assert math.isclose(effective_rank(singular_spectrum(u[:, :1] @ v[:, :1].T)), 1.0, rel_tol=1e-6)
    assert math.isclose(effective_rank(singular_spectrum(u @ v.T)), 4.0, rel_tol=1e-9)  # four equal values


def test_probe_hidden_states_on_constructed_stages():
    h_emb = randn(3, 9, 8, seed=6)
    h0 = 2 * h_emb
    h1 = h0.clone()  # an identity core step
    h_out = randn(3, 9, 8, seed=7)
    p = probe_hidden_states((h_emb, h0, h1, h_out))
    assert p.stages == ["h_emb", "h^(0)", "h^(1)", "h_out"]
    assert p.blocks == ["prelude", "core 1", "coda"]
    assert torch.allclose(p.update_magnitude[:2], torch.tensor([2 / 3, 0.0], dtype=torch.float64))
    assert torch.allclose(p.cka.diagonal(), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(p.cka, p.cka.T)
    assert math.isclose(p.cka[0, 1], 1.0) and math.isclose(p.cka[1, 2], 1.0) and p.cka[0, 3] < 0.9
    assert p.spectra.shape == (4, 8) and torch.all(p.spectra[:, 0] == 1.0)
    assert torch.all(p.spectra[:, 1:] <= p.spectra[:, :-1] + 1e-12)  # non-increasing
    assert torch.allclose(p.spectra[0], p.spectra[1])  # scaling does not change the normalised spectrum
    json.dumps(p.to_dict())  # plain data


def test_padding_is_dropped():
    stages = [randn(2, 8, 6, seed=s) for s in range(4)]
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    ref = probe_hidden_states(stages, mask)
    for h in stages:
        h[1, :3] = 1e3  # garbage in the padding positions
    got = probe_hidden_states(stages, mask)
    assert torch.allclose(ref.cka, got.cka) and torch.allclose(ref.update_magnitude, got.update_magnitude)
    assert ref.spectra.shape[1] == 5  # the shortest sample has 5 real tokens
    with pytest.raises(ValueError, match="at least 3 stages"):
        probe_hidden_states(stages[:2])
    with pytest.raises(ValueError, match="attention_mask must be"):
        probe_hidden_states(stages, mask[:, :4])


def own_stages(model, ids: torch.Tensor, loops: int) -> list[torch.Tensor]:
    """(h_emb, h^(0), ..., h^(K), h_out) rebuilt from the model's stages, not from output_hidden_states."""
    B, T = ids.shape
    ctx = model.layer_context(torch.arange(T)[None].expand(B, T), loops=loops)
    h_emb = model.embed(ids)
    state = model.start(h_emb, ctx)
    stages = [h_emb, state["h"]]
    for t in range(loops if model.config.is_recursive else 0):
        state = model.iterate(state, t, t + 1, ctx)
        stages.append(state["h"])
    return stages + [model.finish(state, ctx)]


@pytest.mark.parametrize("layout,scheme,loops", [("1+2R3+1", "mesh", 3), ("1+2R3+1", "residual", 2), ("3", None, 1)])
def test_probe_model(layout, scheme, loops):
    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_attention_heads=4, vocab_size=50)
    model = MeshForCausalLM(MeshConfig.from_layout(layout, scheme=scheme, **kw)).eval()
    ids = torch.randint(0, 50, (2, 10))
    p = probe_model(model, ids, loops=loops)
    k = loops if scheme else 0
    assert len(p.stages) == k + 3 and len(p.blocks) == k + 2
    with torch.no_grad():
        hs = own_stages(model, ids, loops)
    assert len(hs) == k + 3
    S, mean = len(hs), lambda f: sum(f(b) for b in range(2)) / 2  # noqa: E731
    want_mag = torch.tensor([mean(lambda b: relative_update_magnitude(hs[i][b], hs[i + 1][b])) for i in range(S - 1)], dtype=torch.float64)
    want_cka = torch.tensor([[mean(lambda b: rbf_cka(hs[i][b], hs[j][b])) for j in range(S)] for i in range(S)], dtype=torch.float64)
    want_rank = torch.tensor([mean(lambda b: effective_rank(singular_spectrum(hs[i][b]))) for i in range(S)], dtype=torch.float64)
    torch.testing.assert_close(p.update_magnitude, want_mag, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(p.cka, want_cka, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(p.effective_rank, want_rank, rtol=1e-6, atol=1e-9)
    assert p.update_magnitude.max() > 0.05  # real blocks change h: the comparison is not between zeros
    if scheme is None:
        assert p.update_magnitude[-1] == 0  # a vanilla model has no coda: an identity block
