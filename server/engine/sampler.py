"""Sampling parameters and the per-step token choice: small pure functions over a (B, V) logits batch.

Before the draw, a row's logits are adjusted as vLLM does, in this order: ``logit_bias``, ``min_tokens``
(the end-of-text token is masked while fewer tokens were generated), then the repetition, frequency
and presence penalties. Logprobs are reported from the model's raw distribution (vLLM's default).

The draw is the exponential race: ``argmax(p / q)`` with ``q ~ Exp(1)`` i.i.d. per token picks token
i with probability ``p_i`` (Gumbel-max in another form). It is vectorized across rows and stays
batch-invariant: each sampled row takes one fresh 32-bit key per step from its own ``torch.Generator``
(seeded by the request), and a token's noise is a hash of (that key, the token's id), computed for
all rows at once. So the same seed and parameters give the same tokens alone or in any batch, and the
noise of a token depends on nothing else in the batch. Greedy rows take the argmax.

top-k and top-p sort no row's vocabulary: top-k compares with the k-th value (``topk``), top-p bins
tokens by log-probability and ranks only the bin where the nucleus ends (`nucleus`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 5  # OpenAI's completions API allows 0-5 top logprobs
GREEDY_BELOW = 1e-5  # temperatures under this are greedy, as in vLLM (in float32 they would divide by ~0)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded (vLLM names). ``top_k`` 0 or -1 and ``top_p`` 1 switch those filters off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the top k
    prompt_logprobs: bool = False  # logprobs of the prompt tokens too (``echo`` with ``logprobs``)
    ignore_eos: bool = False  # keep going past the end-of-text token (benchmarks)
    min_tokens: int = 0  # no end-of-text or stop-string finish before this many tokens
    detokenize: bool = True  # build the text incrementally (stop strings need it)
    presence_penalty: float = 0.0  # [-2, 2]: subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # [-2, 2]: times how often each token was generated so far, subtracted
    repetition_penalty: float = 1.0  # (0, 2]: tokens of the prompt or output: logit / p if > 0, else logit * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to the logits; a dict works too

    def __post_init__(self):
        def bad(msg):
            raise ValueError(msg)

        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            bad(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings")
        if self.stop and not self.detokenize:
            bad("stop strings need detokenize=True")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        for tok, bias in self.logit_bias:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                bad(f"logit_bias keys must be token ids (integers >= 0), got {tok!r}")
            if not -100.0 <= bias <= 100.0:
                bad(f"logit_bias values must be in [-100, 100], got {bias!r} for token {tok}")

    @property
    def penalized(self) -> bool:
        """Whether the tokens seen so far change this row's logits."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generator(self, device: torch.device | str, offset: int = 0) -> torch.Generator | None:
        """The sequence's private noise source (None for greedy). ``offset`` separates the n choices of one request."""
        if self.greedy:
            return None
        seed = secrets.randbits(63) if self.seed is None else self.seed + offset
        return torch.Generator(device=device).manual_seed(seed % (1 << 64))


@dataclass
class BatchSampling:
    """The sampling parameters of a batch's rows as tensors, built once per batch composition."""

    temperature: torch.Tensor  # (S,) float: the sampled rows'
    top_k: torch.Tensor | None  # (S,) long, V where off; None when no sampled row filters
    top_p: torch.Tensor | None  # (S,) float, 1 where off; None when no sampled row filters
    sampled: torch.Tensor | None  # (S,) long: indices of the non-greedy rows; None when all are greedy
    generators: list = field(default_factory=list)  # one per sampled row, in `sampled` order
    bias: tuple | None = None  # (rows, token ids, values) of every row's logit_bias; None when no row has one
    min_rows: list = field(default_factory=list)  # rows with min_tokens > 0 whose end-of-text token is a stop
    penalties: "Penalties | None" = None

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list, vocab: int, device,
              prompts: list | None = None) -> "BatchSampling":
        """``prompts``: each row's prompt ids (the repetition penalty counts them); needed only when a row has it."""
        adjust = dict(bias=_bias(params, device), min_rows=[i for i, p in enumerate(params) if p.min_tokens and not p.ignore_eos],
                      penalties=Penalties.build(params, prompts, vocab, device))
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return cls(torch.ones(0, device=device), None, None, None, [], **adjust)
        sampled = [params[i] for i in rows]
        top_k = top_p = None
        if any(0 < p.top_k < vocab for p in sampled):
            top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in sampled], device=device)
        if any(p.top_p < 1.0 for p in sampled):
            top_p = torch.tensor([p.top_p for p in sampled], dtype=torch.float32, device=device)
        temperature = torch.tensor([p.temperature for p in sampled], dtype=torch.float32, device=device)
        return cls(temperature, top_k, top_p, torch.tensor(rows, device=device), [generators[i] for i in rows], **adjust)


def _bias(params: list[SamplingParams], device) -> tuple | None:
    entries = [(i, tok, b) for i, p in enumerate(params) for tok, b in p.logit_bias]
    if not entries:
        return None
    rows, ids, values = zip(*entries)
    return (torch.tensor(rows, device=device), torch.tensor(ids, device=device),
            torch.tensor(values, dtype=torch.float32, device=device))


def token_counts(id_lists: list[list[int]], vocab: int, device) -> torch.Tensor:
    """(R, V) float: how often each token id occurs in each list."""
    counts = torch.zeros(len(id_lists), vocab, device=device)
    lengths = torch.tensor([len(x) for x in id_lists], device=device)
    if int(lengths.sum()) == 0:
        return counts
    rows = torch.repeat_interleave(torch.arange(len(id_lists), device=device), lengths)
    ids = torch.tensor([t for x in id_lists for t in x], device=device)
    return counts.index_put_((rows, ids), torch.ones_like(ids, dtype=counts.dtype), accumulate=True)


@dataclass
class Penalties:
    """The penalized rows of a batch: which they are, their three penalties, (for the repetition
    penalty) which tokens their prompts hold, and how often each row generated each token, counted
    incrementally: a step adds only the tokens that arrived since the last one."""

    rows: list[int]
    presence: torch.Tensor  # (R, 1)
    frequency: torch.Tensor  # (R, 1)
    repetition: torch.Tensor  # (R, 1)
    prompt_seen: torch.Tensor | None  # (R, V) bool; None when no row has a repetition penalty
    counts: torch.Tensor | None = None  # (R, V) float: output tokens counted so far
    counted: list = field(default_factory=list)  # per row, how many of its output tokens `counts` holds

    @classmethod
    def build(cls, params: list[SamplingParams], prompts: list | None, vocab: int, device) -> "Penalties | None":
        rows = [i for i, p in enumerate(params) if p.penalized]
        if not rows:
            return None
        col = lambda name: torch.tensor([[getattr(params[i], name)] for i in rows], dtype=torch.float32, device=device)  # noqa: E731
        seen = None
        if any(params[i].repetition_penalty != 1.0 for i in rows):
            if prompts is None:
                raise ValueError("the repetition penalty needs the rows' prompt ids")
            seen = token_counts([prompts[i] for i in rows], vocab, device) > 0
        return cls(rows, col("presence_penalty"), col("frequency_penalty"), col("repetition_penalty"), seen)

    def update(self, outputs: list[list[int]], vocab: int, device) -> torch.Tensor:
        """The counts (R, V) after adding each row's output tokens not counted yet."""
        if self.counts is None:
            self.counts, self.counted = torch.zeros(len(outputs), vocab, device=device), [0] * len(outputs)
        new = [out[n:] for out, n in zip(outputs, self.counted)]
        if any(new):
            self.counts += token_counts(new, vocab, device)
            self.counted = [len(out) for out in outputs]
        return self.counts

    def apply(self, logits: torch.Tensor, outputs: list[list[int]]) -> torch.Tensor:
        """Penalized logits (R, V) of these rows, given their logits (R, V) and each row's output ids so far."""
        counts = self.update(outputs, logits.shape[-1], logits.device)
        generated = counts > 0
        seen = generated if self.prompt_seen is None else generated | self.prompt_seen
        rep = self.repetition
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        return logits - self.frequency * counts - self.presence * generated


def adjust_logits(logits: torch.Tensor, batch: BatchSampling, outputs: list[list[int]], eos_token_id: int | None,
                  min_tokens: list[int]) -> torch.Tensor:
    """logit_bias, then min_tokens, then the penalties, on a float copy of the (B, V) logits; the logits
    themselves when no row asks for any of them. ``outputs``: each row's output ids so far."""
    early = [i for i in batch.min_rows if len(outputs[i]) < min_tokens[i]] if eos_token_id is not None else []
    if batch.bias is None and not early and batch.penalties is None:
        return logits
    logits = logits.float().clone()
    if batch.bias is not None:
        logits.index_put_(batch.bias[:2], batch.bias[2], accumulate=True)
    if early:
        logits[early, eos_token_id] = float("-inf")
    if batch.penalties is not None:
        rows = batch.penalties.rows
        logits[rows] = batch.penalties.apply(logits[rows], [outputs[i] for i in rows])
    return logits


BINS, BIN_NATS = 256, 1 / 16  # the top-p histogram: bins of 1/16 nat of log-probability below each row's max


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Masks (to -inf) the tokens outside each row's top k, then outside the nucleus p of what is left
    (a token goes when the tokens likelier than it already hold p; ties stay together). (B, V) -> (B, V).
    No row's vocabulary is sorted: top-k takes the k-th value from ``topk``, top-p uses a histogram."""
    keep = None
    if top_k is not None:
        active = top_k < logits.shape[-1]
        if bool(active.any()):
            vals = logits.topk(int(top_k[active].max()), dim=-1).values  # (B, k_max), likeliest first
            kth = vals.gather(1, (top_k.clamp(max=vals.shape[-1]) - 1)[:, None])
            logits = _drop(logits, (logits < kth) & active[:, None])
            if top_p is not None and bool(active.all()):  # every row's candidates are sorted already
                ranked = vals.masked_fill(vals < kth, float("-inf"))
                keep = logits >= _nucleus_floor(ranked, ranked.softmax(dim=-1), torch.zeros_like(kth), top_p)
    if top_p is not None:  # rows at 1 keep everything (a float cumsum may reach 1 before the last token)
        keep = nucleus(logits, top_p) if keep is None else keep
        logits = _drop(logits, ~keep & (top_p < 1.0)[:, None])
    return logits


def _drop(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x.masked_fill(mask, -inf)`` as arithmetic (x + log(1 - mask)): on CPU a boolean select over a
    (B, V) batch costs several times more than this, and the draw does several."""
    return x + torch.log1p(-mask.to(x.dtype))


def _nucleus_floor(ranked: torch.Tensor, probs: torch.Tensor, before: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(B, 1): the smallest of `ranked` (values, likeliest first, with their `probs`) that stays in the
    nucleus, given the mass `before` (B, 1) of likelier tokens not among them."""
    likelier = probs.cumsum(dim=-1) - probs
    stays = (before + likelier < top_p[:, None]) & (probs > 0)
    return ranked.masked_fill(~stays, float("inf")).min(dim=-1, keepdim=True).values


def nucleus(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(B, V) bool: the tokens of each row's nucleus. Tokens are binned by log-probability below the
    row's max; a bin whose cumulative mass (likeliest bins first) stays under p is kept whole, a bin
    the tokens before which already reach p goes whole, and only the one boundary bin is ranked."""
    logp = logits.float().log_softmax(dim=-1)
    probs = logp.exp()
    bins = ((logp.max(dim=-1, keepdim=True).values - logp) / BIN_NATS).clamp_(max=BINS - 1).long()  # -inf -> last
    mass = torch.zeros(len(logits), BINS, device=logits.device).scatter_add_(1, bins, probs)
    cum = mass.cumsum(dim=-1)
    edge = (cum < top_p[:, None]).sum(dim=-1, keepdim=True)  # (B, 1) the first bin reaching p (BINS: none does)
    before = (cum - mass).gather(1, edge.clamp(max=BINS - 1))  # mass of the bins likelier than the edge
    in_edge = bins == edge
    ranked = (probs * in_edge).topk(max(1, int(in_edge.sum(dim=-1).max())), dim=-1).values
    floor = _nucleus_floor(ranked, ranked, before, top_p)  # the least likely token of the edge bin that stays
    return (bins < edge) | (in_edge & (probs >= floor))


def row_keys(generators: list, device) -> torch.Tensor:
    """(S, 1) int32: one fresh key per row, each from the row's own generator (its only use this step)."""
    keys = [torch.randint(-(2**31), 2**31 - 1, (1,), dtype=torch.int32, generator=g, device=g.device) for g in generators]
    return torch.cat(keys).to(device)[:, None]


def race_noise(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise (S, C) for token ids (S, C) or (1, C) under row keys (S, 1): murmur3's 32-bit finalizer
    of (id * golden ratio) ^ key, its top 24 bits as a uniform in (0, 1), then -log. int32 products wrap."""
    z = (ids * -1640531535) ^ keys  # 0x9E3779B1
    z = z ^ ((z >> 16) & 0xFFFF)  # (masks make the arithmetic shifts logical)
    z = z * -2048144789  # 0x85EBCA6B
    z = z ^ ((z >> 13) & 0x7FFFF)
    z = z * -1028477387  # 0xC2B2AE35
    z = z ^ ((z >> 16) & 0xFFFF)
    u = ((z >> 8) & 0xFFFFFF).float().add_(0.5).mul_(1.0 / (1 << 24))
    return u.log_().neg_()


def exponential_race(probs: torch.Tensor, generators: list) -> torch.Tensor:
    """One draw per row from ``probs`` (S, V), row i keyed by ``generators[i]``. Returns (S,) long."""
    ids = torch.arange(probs.shape[-1], dtype=torch.int32, device=probs.device)[None]
    return race_noise(row_keys(generators, probs.device), ids).reciprocal_().mul_(probs).argmax(dim=-1)


def sample(logits: torch.Tensor, batch: BatchSampling) -> torch.Tensor:
    """Next tokens (B,) for logits (B, V): argmax for greedy rows, a seeded draw for the others."""
    tokens = logits.argmax(dim=-1)
    if batch.sampled is None:
        return tokens
    drawn = exponential_race(draw_probs(logits, batch), batch.generators)
    return tokens.index_copy(0, batch.sampled, drawn)


def draw_probs(logits: torch.Tensor, batch: BatchSampling) -> torch.Tensor:
    """The distribution each sampled row draws from: temperature, then top-k and top-p. (B, V) -> (S, V)."""
    sub = logits[batch.sampled].float() / batch.temperature[:, None]  # (S, V)
    # a tiny temperature (or repetition penalty) overflows to +inf: those tokens tie at the largest float
    sub = apply_top_k_top_p(sub.clamp_(max=torch.finfo(torch.float32).max), batch.top_k, batch.top_p)
    return sub.softmax(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """Log-probabilities under the model's distribution (before temperature and filters, as vLLM reports).

    logits (B, V), tokens (B,) -> chosen (B,), top ids (B, k), top logprobs (B, k).
    """
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, tokens[:, None]).squeeze(1)
    top_lp, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], tokens[:, None][:, :0])
    return chosen, top_ids, top_lp


class Sampler:
    """The engine's token choice for one step: rows' next tokens and, where asked, their logprobs.

    ``sampler(seqs, logits)`` -> (tokens, {row: [(logprob, [(id, logprob), ...])]}); rows are `seqs`
    in order (each has ``id``, ``params``, ``generator``, ``prompt_ids`` and ``output_ids``). The
    tensors of a batch's parameters are rebuilt only when the batch changes. ``eos_token_id``: the
    token that ``min_tokens`` masks (None: min_tokens masks nothing here).
    """

    def __init__(self, vocab_size: int, device, eos_token_id: int | None = None):
        self.vocab_size, self.device, self.eos_token_id = vocab_size, device, eos_token_id
        self._key: tuple = ()
        self._batch: BatchSampling | None = None

    def _batch_sampling(self, seqs) -> BatchSampling:
        key = tuple(s.id for s in seqs)
        if key != self._key:
            self._key = key
            self._batch = BatchSampling.build([s.params for s in seqs], [s.generator for s in seqs], self.vocab_size,
                                              self.device, prompts=[s.prompt_ids for s in seqs])
        return self._batch

    def __call__(self, seqs, logits: torch.Tensor) -> tuple[list[int], dict[int, list]]:
        batch = self._batch_sampling(seqs)
        scores = adjust_logits(logits, batch, [s.output_ids for s in seqs], self.eos_token_id,
                               [s.params.min_tokens for s in seqs])
        tokens_t = sample(scores, batch)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        lp_rows = {}
        if want:
            pick = torch.tensor(want, device=logits.device)
            k = max(seqs[i].params.logprobs for i in want)
            chosen, top_ids, top_lp = token_logprobs(logits[pick], tokens_t[pick], k)
            chosen, top_ids, top_lp = chosen.tolist(), top_ids.tolist(), top_lp.tolist()
            for j, i in enumerate(want):
                kk = seqs[i].params.logprobs
                lp_rows[i] = [(chosen[j], list(zip(top_ids[j][:kk], top_lp[j][:kk])))]
        return tokens_t.tolist(), lp_rows


def distribution(seq, logits: torch.Tensor, history: list[int], vocab: int, eos_token_id: int | None) -> torch.Tensor:
    """The distribution one sampled, unpenalized row draws from after `history` output tokens: logits
    (n, V) -> (n, V), logit_bias, min_tokens, temperature and filters applied (speculative sampling
    compares the draft's and the target's)."""
    batch = BatchSampling.build([seq.params] * len(logits), [seq.generator] * len(logits), vocab, logits.device)
    scores = adjust_logits(logits, batch, [history] * len(logits), eos_token_id, [seq.params.min_tokens] * len(logits))
    return draw_probs(scores, batch)


def prompt_logprobs(prompt_ids: list[int], logits: torch.Tensor, k: int) -> list:
    """Per prompt token: None for the first, else (logprob, top-k list) under the preceding context.
    logits: (len(prompt_ids), V), row i predicting token i + 1."""
    ids = torch.tensor(prompt_ids[1:], device=logits.device)
    chosen, top_ids, top_lp = token_logprobs(logits[:-1], ids, k)
    return [None] + [(c, list(zip(ti, tl))) for c, ti, tl in zip(chosen.tolist(), top_ids.tolist(), top_lp.tolist())]
