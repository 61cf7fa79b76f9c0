"""Per-step recursion depth for depth-elastic training.

The depth K of optimizer step ``step`` is a pure function of (seed, step), so every data-parallel
rank draws the same K without communicating, and a resumed run draws what the uninterrupted one
would have.

- ``fixed``: always K (the paper's setting).
- ``uniform``: K ~ U{1, ..., max_loops}: every depth the server may be asked for is trained equally.
- ``weighted``: K drawn with the relative weights ``depth_weights`` (one per depth 1..max_loops),
  e.g. [1, 1, 1, 3] trains the deepest path half the time so extra loops keep paying off.
- ``heavy``: Huginn-style (Geiping et al. 2025): tau ~ N(log(mean - 1) - sigma^2/2, sigma),
  K = 1 + Poisson(e^tau), clipped to [1, max_loops]. Mostly shallow, cheap steps with a heavy
  tail of deep ones; before clipping E[K] = mean.
"""

from __future__ import annotations

import math

import numpy as np


def sample_depth(
    step: int, seed: int, mode: str, max_loops: int, fixed: int = 0, mean: float = 2.5, sigma: float = 0.5, weights=None
) -> int:
    if mode == "fixed":
        return fixed
    g = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, 0xDE97])))
    if mode == "uniform":
        return int(g.integers(1, max_loops + 1))
    if mode == "weighted":
        p = np.asarray(weights, dtype=np.float64)
        return int(g.choice(np.arange(1, max_loops + 1), p=p / p.sum()))
    if mode == "heavy":
        if mean <= 1:
            return 1
        tau = g.normal(math.log(mean - 1) - 0.5 * sigma**2, sigma)
        return int(min(max_loops, 1 + g.poisson(math.exp(tau))))
    raise ValueError(f"unknown depth sampling {mode!r}")


def unused_parameters(model, loops: int, all_depths: bool = False) -> list:
    """Parameters a forward at depth ``loops`` does not touch: the MeSH router pairs past step K and,
    with per-depth coda routers, those of the depths the step's loss does not read out (all but K, or
    with ``all_depths`` (a loss at every depth 1..K) those past K).

    Their gradients are dropped (set to None) so AdamW leaves them alone on that step, the same
    way in a single process and under DDP/FSDP (which would otherwise hand back zeros).
    """
    rec = getattr(model, "recurrence", None)
    if rec is None or not hasattr(rec, "write_routers"):
        return []
    params = []
    for pair in range(loops + 1, len(rec.write_routers)):  # pair 0 is transitional, step t uses pair t + 1
        params += list(rec.write_routers[pair].parameters()) + list(rec.read_routers[pair].parameters())
    for k, router in enumerate(getattr(rec, "coda_routers", []), start=1):  # coda_routers[K - 1] serves depth K
        if k > loops or (k < loops and not all_depths):
            params += list(router.parameters())
    return params
