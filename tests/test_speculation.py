"""Self-speculation by depth continuation: rows deeper than --speculative-loops d draft g tokens at
depth d and one verify pass resumes iterations d..K-1 from the drafts' saved recurrence states. The
output is exactly depth-K decoding: greedy tokens equal MeshForCausalLM.generate's in a batch of mixed
depths and of drafting and non-drafting rows, across preemption and aborts in the middle of a round, and
max_tokens / stop strings cut an accepted run where plain decoding stops.

A tiny random checkpoint on CPU (tests/server_fixtures.py), the engine stepped in the test's thread.
"""

from __future__ import annotations

import pytest
import torch

from server import Engine, EngineConfig, SamplingParams
from server_fixtures import reference_greedy, same_greedy, one_torch_thread  # noqa: F401 (autouse fixture)

PROMPTS = ["First Citizen:", "All: Speak", "To be, or not to be", "The quick brown fox jumps"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def run_all(engine):
    outs = []
    while engine.has_work():
        outs += engine.step()
    return outs


def test_greedy_speculation_matches_generate_in_a_mixed_batch(ckpt):
    """Depths 1..4 with d = 1 (depth-1 rows cannot draft) and a seeded, penalized sampled row (which
    decodes plainly: its penalties would have to see the drafts): every greedy row equals generate(), the
    sampled row equals its text with speculation off, and loop_steps counts the drafts' iterations and the
    verify passes'."""
    eng = Engine(EngineConfig(model=ckpt, speculative_loops=1, num_speculative_tokens=3, speculative_max_batch=64), metrics=False)
    seqs = [(p, k, eng.add_request([eng.encode(p)], GREEDY, loops=k)[0]) for k in (4, 1, 3, 2) for p in PROMPTS]
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True, presence_penalty=0.5)
    (sampled,) = eng.add_request([eng.encode(PROMPTS[0])], seeded, loops=4)
    run_all(eng)
    for p, k, seq in seqs:
        assert same_greedy(seq.output_ids, reference_greedy(eng.model, eng.encode(p), k, GREEDY.max_tokens)), (p, k)
        if k == 1:
            assert seq.num_drafted == 0 and seq.loop_steps == 1 * GREEDY.max_tokens
        else:
            assert seq.num_drafted > 0
            plain = GREEDY.max_tokens - seq.num_spec_emitted  # tokens decoded outside rounds (the first, ...)
            # a draft costs d = 1 iteration, its share of the verify pass k - 1; a plain token k
            assert seq.loop_steps == 1 * seq.num_drafted + (k - 1) * seq.num_drafted + k * plain
    assert sum(seq.num_accepted for _, _, seq in seqs) > 0
    plain = Engine(EngineConfig(model=ckpt), metrics=False)
    assert plain.generate([PROMPTS[0]], seeded, loops=4)[0].token_ids == sampled.output_ids


def test_max_tokens_and_stop_strings_cut_an_accepted_run(ckpt):
    spec = Engine(EngineConfig(model=ckpt, speculative_loops=2, num_speculative_tokens=4, speculative_max_batch=64), metrics=False)
    plain = Engine(EngineConfig(model=ckpt), metrics=False)
    for max_tokens in (1, 2, 5, 7):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        a, b = spec.generate(PROMPTS[:2], params, loops=4), plain.generate(PROMPTS[:2], params, loops=4)
        assert [x.token_ids for x in a] == [x.token_ids for x in b] and all(len(x.token_ids) == max_tokens for x in a)
    cut = None
    for prompt in PROMPTS:  # a continuation with a 2-character string first seen past its start: the stop
        full = plain.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), loops=3)[0].text
        at = [i for i in range(4, len(full) - 2) if full.find(full[i : i + 2]) == i and "\ufffd" not in full[i : i + 2]]
        if at:
            cut = prompt, full, at[0]
            break
    prompt, full, at = cut
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(full[at : at + 2],))
    a, b = spec.generate([prompt], params, loops=3)[0], plain.generate([prompt], params, loops=3)[0]
    assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, "stop") and a.text == full[:at]


def test_preemption_and_abort_in_the_middle_of_a_round(ckpt, monkeypatch):
    """A 0.25 MiB pool under drafting rows of every depth: rounds are cut by preemption (their drafts are
    dropped, the row recomputes its verified tokens) and by an abort; the outputs still equal generate()'s
    and every block comes back."""
    eng = Engine(EngineConfig(model=ckpt, kv_cache_mb=0.25, max_num_batched_tokens=32, max_batch_size=16, speculative_loops=1,
                              num_speculative_tokens=3, speculative_max_batch=64), metrics=False)
    cut = []
    real = eng.scheduler._preempt
    monkeypatch.setattr(eng.scheduler, "_preempt", lambda s: cut.append(len(s.draft_ids)) or real(s))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    seqs = [s for k in (4, 2, 3) for s in eng.add_request([eng.encode(p) for p in PROMPTS], params, loops=k)]
    (gone,) = eng.add_request([eng.encode(PROMPTS[1])], params, loops=4)
    while not gone.draft_ids:
        eng.step()
    eng.abort([gone])
    outs = run_all(eng)
    assert [o.finish_reason for o in outs if o.seq is gone] == ["abort"]
    assert any(n > 0 for n in cut), "no round was cut by a preemption"
    for s in seqs:
        assert same_greedy(s.output_ids, reference_greedy(eng.model, s.prompt_ids, s.loops, 40))
    assert eng.blocks.num_used == 0


def test_drafting_stops_above_the_crossover_except_for_seeded_rows(ckpt):
    """With the default --speculative-max-batch 1 a greedy row drafts alone but not among nine; a
    seeded sampled row drafts in any batch (its draws must not depend on the batch), so its text is the
    same alone and in a busy batch."""
    eng = Engine(EngineConfig(model=ckpt, speculative_loops=1), metrics=False)
    (alone,) = eng.add_request([eng.encode(PROMPTS[0])], GREEDY, loops=4)
    run_all(eng)
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    (solo,) = eng.add_request([eng.encode(PROMPTS[1])], seeded, loops=4)
    run_all(eng)
    busy = eng.add_request([eng.encode(p) for p in PROMPTS * 2], GREEDY, loops=4)
    (crowded,) = eng.add_request([eng.encode(PROMPTS[1])], seeded, loops=4)
    run_all(eng)
    assert alone.num_drafted > 0 and all(s.num_drafted == 0 for s in busy)
    assert solo.num_drafted > 0 and crowded.num_drafted > 0 and crowded.output_ids == solo.output_ids


def test_speculation_settings_are_checked(ckpt):
    with pytest.raises(ValueError, match="below the model's max_loops"):
        Engine(EngineConfig(model=ckpt, speculative_loops=4), metrics=False)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative_loops=1, num_speculative_tokens=0)


def chi_square_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of the chi-square homogeneity test of two count vectors over the same bins."""
    keep = (a + b) > 0
    table = torch.stack([a[keep], b[keep]]).double()  # (2, bins)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    dof = keep.sum().item() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2))


def bigram_counts(engine, prompts, loops: int, seed0: int, vocab: int) -> torch.Tensor:
    seqs = []
    for i, ids in enumerate(prompts):
        seqs += engine.add_request([ids], SamplingParams(temperature=1.0, seed=seed0 + i, max_tokens=25, ignore_eos=True,
                                                         detokenize=False), loops=loops)
    run_all(engine)
    counts = torch.zeros(vocab * vocab)
    for s in seqs:
        toks = s.prompt_ids[-1:] + s.output_ids
        for a, b in zip(toks, toks[1:]):
            counts[a * vocab + b] += 1
    return counts, seqs


def test_speculative_sampling_keeps_the_depth_k_distribution(ckpt):
    """Temperature 1 on an 8-token vocabulary: 10,000 tokens sampled with speculation (drafts at depth 1,
    accept/reject at depth 3) and 10,000 without; a chi-square test on the 64 bigram bins cannot tell them
    apart (p > 0.01), while it does tell depth-3 sampling from depth-1 sampling (the test has power)."""
    from transformers import AutoTokenizer

    from model import MeshConfig, MeshForCausalLM

    torch.manual_seed(0)
    cfg = MeshConfig.from_layout("1+1R2+1", scheme="mesh", max_loops=4, hidden_size=32, num_attention_heads=4,
                                 intermediate_size=64, vocab_size=8, initializer_range=0.3, max_position_embeddings=64)
    model, tok = MeshForCausalLM(cfg).eval(), AutoTokenizer.from_pretrained(str(ckpt))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 8, (3,), generator=gen).tolist() for _ in range(400)]
    spec = Engine(EngineConfig(speculative_loops=1, num_speculative_tokens=3, max_batch_size=400, max_waiting=400,
                               max_num_batched_tokens=1600, speculative_max_batch=400), model=model, tokenizer=tok, metrics=False)
    plain = Engine(EngineConfig(max_batch_size=400, max_waiting=400, max_num_batched_tokens=1600), model=model,
                   tokenizer=tok, metrics=False)
    with_spec, seqs = bigram_counts(spec, prompts, 3, 10**6, 8)
    without, _ = bigram_counts(plain, prompts, 3, 0, 8)
    shallow, _ = bigram_counts(plain, prompts, 1, 2 * 10**6, 8)
    drafted, accepted = sum(s.num_drafted for s in seqs), sum(s.num_accepted for s in seqs)
    assert with_spec.sum() == without.sum() == 10_000 and 0 < accepted < drafted
    assert chi_square_p(with_spec, without) > 0.01
    assert chi_square_p(shallow, without) < 0.01
