"""The paper's three hidden-state probes (MeSH, arXiv 2510.07739, section 3), returned as data.

Stages are the hidden states a forward with ``output_hidden_states=True`` returns:

    h_emb, h^(0), h^(1), ..., h^(K), h_out        (K + 3 stages; a vanilla model has K = 0)

and a *block* is what maps one stage to the next: the prelude (h_emb -> h^(0), including MeSH's
transitional write-read cycle), core iteration t (h^(t-1) -> h^(t)), the coda (h^(K) -> h_out).
As in the paper, every probe works on one sample's (seq x dim) hidden-state matrix and is averaged
over the samples of the batch (padding positions dropped when an attention mask is given):

- relative update magnitude of each block, 2 ||f(h) - h||_F / (||f(h)||_F + ||h||_F): 0 for an
  identity block, at most 2 (computation skew: late loops that barely change the state);
- RBF-kernel CKA between every pair of stages (representational stagnation: consecutive loop
  states that are nearly the same);
- singular-value spectrum of each stage, divided by its largest singular value (dimensional
  collapse: a spectrum that decays fast), and its effective rank exp(entropy(s / sum s)).

Plots live with the experiments; this module only computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Probes:
    stages: list[str]  # "h_emb", "h^(0)", ..., "h^(K)", "h_out"
    blocks: list[str]  # "prelude", "core 1", ..., "core K", "coda"
    update_magnitude: torch.Tensor  # (len(blocks),)
    cka: torch.Tensor  # (len(stages), len(stages)), symmetric, 1 on the diagonal
    spectra: torch.Tensor  # (len(stages), r): s_i / s_1, r = shortest sample length or dim
    effective_rank: torch.Tensor  # (len(stages),)

    def to_dict(self) -> dict:
        """Plain lists, ready for json.dump."""
        return {
            "stages": list(self.stages),
            "blocks": list(self.blocks),
            "update_magnitude": dict(zip(self.blocks, self.update_magnitude.tolist())),
            "cka": self.cka.tolist(),
            "spectra": dict(zip(self.stages, self.spectra.tolist())),
            "effective_rank": dict(zip(self.stages, self.effective_rank.tolist())),
        }


# ---------------------------------------------------------------------------------------------
# The three measures on single (n, d) matrices
# ---------------------------------------------------------------------------------------------
def relative_update_magnitude(h: torch.Tensor, f_h: torch.Tensor) -> torch.Tensor:
    """2 ||f(h) - h|| / (||f(h)|| + ||h||) over the whole (n, d) matrix (Frobenius norms)."""
    h, f_h = h.double(), f_h.double()
    denom = f_h.norm() + h.norm()
    return 2 * (f_h - h).norm() / denom if denom > 0 else denom  # both zero: nothing changed


def _centered_rbf_gram(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """RBF kernel exp(-|xi - xj|^2 / (2 sigma^2)), sigma^2 = threshold^2 * median squared distance, centred."""
    x = x.double()
    sq = torch.cdist(x, x).pow(2)  # (n, n)
    n = sq.shape[0]
    off_diag = sq[~torch.eye(n, dtype=torch.bool, device=sq.device)]
    median = off_diag.median() if off_diag.numel() else sq.new_tensor(0.0)
    # Kornblith et al. (2019) scale the bandwidth by the median distance so CKA ignores overall scale.
    sigma2 = threshold**2 * (median if median > 0 else sq.new_tensor(1.0))
    k = torch.exp(-sq / (2 * sigma2))
    h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n  # centring matrix
    return h @ k @ h


def rbf_cka(x: torch.Tensor, y: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """CKA with RBF kernels between two representations of the same n points: x (n, d1), y (n, d2)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares representations of the same points: {x.shape[0]} vs {y.shape[0]} rows")
    return _cka_of_grams(_centered_rbf_gram(x, threshold), _centered_rbf_gram(y, threshold))


def _cka_of_grams(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    # HSIC(K, L) = <HKH, HLH>_F up to a constant that cancels in the ratio.
    return (kx * ky).sum() / torch.sqrt((kx * kx).sum() * (ky * ky).sum())


def singular_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Singular values of x (n, d), largest first, divided by the largest (1.0 first)."""
    s = torch.linalg.svdvals(x.double())
    return s / s[0] if s[0] > 0 else s


def effective_rank(spectrum: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the singular values as a distribution: between 1 (rank one) and len(spectrum)."""
    p = spectrum / spectrum.sum()
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum())


# ---------------------------------------------------------------------------------------------
# Per-stage probes on a batch
# ---------------------------------------------------------------------------------------------
def stage_names(n_stages: int) -> tuple[list[str], list[str]]:
    if n_stages < 3:
        raise ValueError(f"expected (h_emb, h^(0), ..., h^(K), h_out): at least 3 stages, got {n_stages}")
    k = n_stages - 3
    stages = ["h_emb"] + [f"h^({t})" for t in range(k + 1)] + ["h_out"]
    blocks = ["prelude"] + [f"core {t}" for t in range(1, k + 1)] + ["coda"]
    return stages, blocks


def probe_hidden_states(hidden_states, attention_mask: torch.Tensor | None = None, threshold: float = 1.0) -> Probes:
    """The three probes on ``output.hidden_states`` = (h_emb, h^(0), ..., h^(K), h_out), each (B, T, D).

    ``attention_mask`` (B, T), 1 = real token, drops padding before each sample's matrix is measured.
    """
    hs = [h.detach() for h in hidden_states]
    stages, blocks = stage_names(len(hs))
    B, T, _ = hs[0].shape
    if any(h.shape[:2] != (B, T) for h in hs):
        raise ValueError("all stages must share the (batch, seq) shape")
    if attention_mask is None:
        keep = [torch.ones(T, dtype=torch.bool, device=hs[0].device)] * B
    else:
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must be (batch, seq) = {(B, T)}, got {tuple(attention_mask.shape)}")
        keep = [row.bool() for row in attention_mask]
    if min(int(k.sum()) for k in keep) < 2:
        raise ValueError("every sample needs at least 2 real tokens to probe")

    S = len(hs)
    magnitude = torch.zeros(len(blocks), dtype=torch.float64)
    cka = torch.zeros(S, S, dtype=torch.float64)
    spectra, ranks = [], torch.zeros(S, dtype=torch.float64)
    for b in range(B):
        mats = [h[b][keep[b]] for h in hs]  # S matrices of (n_b, D)
        for i in range(S - 1):
            magnitude[i] += relative_update_magnitude(mats[i], mats[i + 1]).cpu()
        grams = [_centered_rbf_gram(m, threshold) for m in mats]
        for i in range(S):
            for j in range(i, S):
                cka[i, j] += _cka_of_grams(grams[i], grams[j]).cpu()
        spectra.append([singular_spectrum(m).cpu() for m in mats])
        for i in range(S):
            ranks[i] += effective_rank(spectra[-1][i])
    r = min(s.numel() for row in spectra for s in row)  # samples may differ in length: keep the common head
    spec = torch.stack([torch.stack([row[i][:r] for row in spectra]).mean(0) for i in range(S)])  # (S, r)
    cka = cka + cka.triu(1).T  # fill the lower triangle
    return Probes(stages, blocks, magnitude / B, cka / B, spec, ranks / B)


@torch.no_grad()
def probe_model(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, loops=None, **kw) -> Probes:
    """Runs ``model`` once with ``output_hidden_states=True`` at depth ``loops`` and probes every stage."""
    out = model(input_ids, attention_mask=attention_mask, loops=loops, use_cache=False, output_hidden_states=True)
    return probe_hidden_states(out.hidden_states, attention_mask, **kw)
