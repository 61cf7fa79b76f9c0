"""The engine's Sampler on its own: logit_bias, min_tokens, the presence / frequency / repetition
penalties (checked against a plain per-row re-implementation of vLLM's formulas), seeded draws that
stay the same alone or in any batch, and the Detokenizer's min_tokens.

Rows are plain objects with the attributes the engine's Sequence gives the sampler (id, params,
generator, prompt_ids, output_ids).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from server.engine.detokenizer import Detokenizer
from server.engine.sampler import Sampler, SamplingParams, apply_top_k_top_p

V, EOS = 50, 0
_ids = itertools.count()


def row(params: SamplingParams, prompt=(1, 2, 3), output=()) -> SimpleNamespace:
    return SimpleNamespace(id=next(_ids), params=params, generator=params.generator("cpu"), prompt_ids=list(prompt),
                           output_ids=list(output))


def logits_for(seed: int, step: int) -> torch.Tensor:
    """A row's logits at a step, the same whatever batch the row is in."""
    return torch.randn(V, generator=torch.Generator().manual_seed(seed * 1000 + step)) * 3


def test_logit_bias_moves_greedy_and_sampled_choices():
    logits = torch.zeros(2, V)
    logits[:, 7] = 5.0  # the argmax without bias
    greedy = row(SamplingParams(temperature=0, logit_bias={9: 100.0}))
    banned = row(SamplingParams(temperature=1.0, seed=3, logit_bias={7: -100.0}))
    sampler = Sampler(V, "cpu")
    for _ in range(20):
        tokens, _ = sampler([greedy, banned], logits)
        assert tokens[0] == 9 and tokens[1] != 7


def test_min_tokens_masks_end_of_text_until_reached():
    logits = torch.zeros(1, V)
    logits[0, EOS] = 50.0  # end-of-text is by far the likeliest
    sampler = Sampler(V, "cpu", eos_token_id=EOS)
    seq = row(SamplingParams(temperature=0, min_tokens=3))
    for expected in (False, False, False, True):
        (tok,), _ = sampler([seq], logits)
        assert (tok == EOS) == expected, seq.output_ids
        seq.output_ids.append(tok)
    ignored = row(SamplingParams(temperature=0, min_tokens=3, ignore_eos=True))  # EOS is a plain token then
    assert sampler([ignored], logits)[0] == [EOS]
    assert Sampler(V, "cpu")([row(SamplingParams(temperature=0, min_tokens=3))], logits)[0] == [EOS], "no EOS id: no mask"


def reference_penalties(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    """vLLM's formulas, one token at a time."""
    out = logits.clone()
    for tok in range(V):
        if tok in prompt or tok in output:
            out[tok] = out[tok] / p.repetition_penalty if out[tok] > 0 else out[tok] * p.repetition_penalty
        count = output.count(tok)
        out[tok] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.7), dict(frequency_penalty=0.8),
                                       dict(presence_penalty=-1.5), dict(repetition_penalty=0.6, frequency_penalty=-0.4,
                                                                         presence_penalty=1.1)])
def test_penalties_match_the_reference_formulas(penalties):
    """Greedy rows pick the argmax of the penalized logits; the batch mixes in a row without penalties."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(2, V, generator=gen) * 4
        prompt = torch.randint(0, V, (6,), generator=gen).tolist()
        output = torch.randint(0, V, (int(torch.randint(0, 12, (1,), generator=gen)),), generator=gen).tolist()
        params = SamplingParams(temperature=0, **penalties)
        seqs = [row(params, prompt, output), row(SamplingParams(temperature=0), prompt, output)]
        tokens, _ = Sampler(V, "cpu")(seqs, logits)
        want = reference_penalties(logits[0], prompt, output, params)
        assert tokens == [int(want.argmax()), int(logits[1].argmax())], trial


def test_penalties_change_what_is_chosen():
    """The same logits every step: without penalties greedy repeats one token; with a frequency
    penalty it moves on, and a repetition penalty avoids the prompt's tokens."""
    logits = torch.linspace(0, 2, V)[None]  # token V-1 first, then V-2, ...
    plain, freq = row(SamplingParams(temperature=0)), row(SamplingParams(temperature=0, frequency_penalty=2.0))
    sampler = Sampler(V, "cpu")
    for _ in range(5):
        for seq, tok in zip([plain, freq], sampler([plain, freq], logits.expand(2, V))[0]):
            seq.output_ids.append(tok)
    assert plain.output_ids == [V - 1] * 5 and len(set(freq.output_ids)) == 5
    rep = row(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[V - 1, V - 2])
    assert sampler([rep], logits)[0] == [V - 3]


def test_seeded_sampling_is_the_same_alone_and_in_any_batch():
    """A seeded row with penalties, bias and min_tokens draws the same tokens alone and among rows of
    every other kind (which join and leave), step after step."""
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=42, frequency_penalty=0.5, repetition_penalty=1.3,
                            logit_bias={4: 2.0}, min_tokens=5)
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.2, top_k=5, seed=1),
              SamplingParams(temperature=0.7, presence_penalty=1.0), SamplingParams(temperature=1.0, logit_bias={3: -50.0})]

    def run(batch_kinds: list[list[SamplingParams]]) -> list[int]:
        mine = row(params)
        neighbours = [row(p) for p in others]
        sampler = Sampler(V, "cpu", eos_token_id=EOS)
        for step, kinds in enumerate(batch_kinds):
            seqs = [n for n in neighbours if n.params in kinds] + [mine]
            seqs = seqs[::-1] if step % 2 else seqs  # the row's position changes too
            logits = torch.stack([logits_for(s.id, step) if s is not mine else logits_for(-1, step) for s in seqs])
            tokens, _ = sampler(seqs, logits)
            for s, t in zip(seqs, tokens):
                s.output_ids.append(t)
        return mine.output_ids

    steps = 24
    alone = run([[]] * steps)
    busy = run([others[: 1 + step % len(others)] for step in range(steps)])
    assert alone == busy and len(set(alone)) > 3
    assert EOS not in alone[:5]


def test_detokenizer_matches_stop_strings_only_from_min_tokens_on():
    decode = lambda ids: "".join(chr(ord("a") + i) for i in ids)  # noqa: E731  one letter per token
    plain = Detokenizer(decode, [0], stop=("bc",))
    assert [plain.add(t) for t in (1, 2)] == [False, True] and plain.text == ""
    late = Detokenizer(decode, [0], stop=("bc",), min_tokens=3)
    assert [late.add(t) for t in (1, 2, 3, 1, 2)] == [False, False, False, False, True]
    assert late.text == "bcd", "the early 'bc' stayed; the one completed after min_tokens ended the text"


def sorted_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The textbook filter, by a full sort of each row (the reference for the sort-free one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.arange(logits.shape[-1])[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p < 1.0)[:, None]  # 1: off
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


@pytest.mark.parametrize("every_row_top_k", [False, True])  # a histogram ranks the nucleus / the top-k values do
@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 10.0])  # from flat to peaked distributions
def test_sort_free_top_k_top_p_keeps_what_a_sort_keeps(scale, every_row_top_k):
    gen = torch.Generator().manual_seed(int(scale * 10))
    vocab = 2048
    logits = torch.randn(64, vocab, generator=gen) * scale
    top_k = torch.tensor([vocab if i % 3 and not every_row_top_k else int(torch.randint(1, 300, (1,), generator=gen))
                          for i in range(64)])
    top_p = torch.rand(64, generator=gen).clamp(min=0.05)
    top_p[::5] = 1.0  # some rows filter by top-k only
    top_p[1::7] = 0.999
    got = apply_top_k_top_p(logits, top_k, top_p)
    want = sorted_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    kept = torch.isfinite(got).sum(dim=-1)
    assert kept.min() >= 1 and kept.max() > (50 if every_row_top_k else 100), "both narrow and wide nuclei were exercised"


def test_extreme_parameters_still_draw_a_likeliest_token():
    """Found by the HTTP fuzz test: a denormal temperature or repetition penalty turns logits into
    +inf; the draw must still return one of the tokens that overflowed, never crash."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0] + [0.0] * (V - 4)])
    for params in (SamplingParams(temperature=5e-324, top_p=0.5), SamplingParams(temperature=5e-324),
                   SamplingParams(temperature=1.0, repetition_penalty=5e-324, top_p=0.9, top_k=3)):
        seq = row(params, prompt=[1, 2])
        (tok,), _ = Sampler(V, "cpu")([seq], logits)
        assert tok in (1, 2), (params, tok)
