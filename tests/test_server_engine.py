"""The serving engine without HTTP: greedy == MeshForCausalLM.generate at every depth, continuous
mixed-depth batching, the depth-aware KV pool (rows skip iterations they do not need, memory by depth,
row moves keep K/V), admission against the byte budget, seeded sampling independent of the batch,
stop strings / end-of-text, aborts, prompt logprobs, and the sampling and detokenizer functions.

A tiny random checkpoint (tests/server_fixtures.py) on CPU; the engine is stepped in the test's thread.
"""

from __future__ import annotations

import random

import pytest
import torch

from server import Engine, EngineConfig, SamplingParams
from server.engine.detokenizer import Detokenizer
from server.engine import RequestError
from server.engine.kv_pool import KVPool
from server.engine.sampler import BatchSampling, apply_top_k_top_p, exponential_race, sample
from server.engine.sequence import Sequence
from server_fixtures import LINES, build_checkpoint, reference_greedy, same_greedy, one_torch_thread  # noqa: F401 (autouse fixture)

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["First Citizen:", "All: Speak", "To be, or not to be", "The quick brown fox jumps", "a", "Resolved."]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny"))  # 1+1R2+1 mesh, max_loops 4


@pytest.fixture(scope="module")
def engine(ckpt):
    return Engine(EngineConfig(model=ckpt, max_batch_size=8), metrics=False)


@pytest.fixture(scope="module")
def refs(engine):
    """generate()'s greedy continuation for every prompt and depth."""
    return {(p, k): reference_greedy(engine.model, engine.encode(p), k, GREEDY.max_tokens) for p in PROMPTS for k in range(1, 5)}


def run_all(engine):
    while engine.has_work():
        engine.step()


def test_greedy_alone_matches_generate_at_every_depth(engine, refs):
    for k in range(1, 5):
        outs = engine.generate(PROMPTS, GREEDY, loops=k)  # one batch of ragged prompts at depth k
        for p, out in zip(PROMPTS, outs):
            assert out.loops == k and out.finish_reason == "length"
            assert same_greedy(out.token_ids, refs[(p, k)]), (p, k)
        alone = engine.generate([PROMPTS[0]], GREEDY, loops=k)[0]
        assert same_greedy(alone.token_ids, refs[(PROMPTS[0], k)])
    # the depths really differ (otherwise the comparisons above prove little)
    assert len({tuple(refs[(PROMPTS[0], k)][0]) for k in range(1, 5)}) == 4


def test_continuous_mixed_depth_batching_matches_generate(engine, refs):
    """Requests of random depths join while others decode and leave when done; rows stay sorted
    deepest first and every sequence still produces generate()'s tokens."""
    rng = random.Random(0)
    jobs = [(p, rng.randint(1, 4)) for p in PROMPTS * 3]
    started, seen_depths, steps = [], set(), 0
    while jobs or engine.has_work():
        if jobs and rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):  # sometimes several join in one prefill step
                if jobs:
                    p, k = jobs.pop()
                    started += [(p, k, s) for s in engine.add_request([engine.encode(p)], GREEDY, loops=k)]
        engine.step()
        steps += 1
        rows = engine.pool.rows
        assert [s.loops for s in rows] == sorted((s.loops for s in rows), reverse=True)
        assert [s.row for s in rows] == list(range(len(rows)))
        seen_depths.add(tuple(sorted({s.loops for s in rows})))
    assert max(len(d) for d in seen_depths) >= 3, "the batch never mixed depths"
    assert steps < len(started) * GREEDY.max_tokens, "no batching happened"
    for p, k, seq in started:
        assert same_greedy(seq.output_ids, refs[(p, k)]), (p, k)
    assert engine.pool.rows == [] and engine.pool.reserved == 0 and engine.pool.allocated_bytes() == 0


def test_shallow_rows_skip_deep_iterations_and_hold_no_deep_kv(engine, monkeypatch):
    pool, cfg = engine.pool, engine.model.config
    for k in range(1, 5):
        assert pool.bytes_per_token(k) == engine.model.kv_bytes_per_token(k) == 2 * cfg.num_layer_applications(k) * cfg.hidden_size * 4
    # Only depth-1 rows: nothing is allocated for core iterations >= 1.
    for p in PROMPTS[:2]:
        engine.add_request([engine.encode(p)], GREEDY, loops=1)
    engine.step()
    assert pool.bufs[0] is not None and all(b is None for b in pool.bufs[1:])
    assert pool.allocated_bytes() == pool.bufs[0].shape[2] * pool.length * pool.bytes_per_token(1)
    # Two depth-4 rows join: iterations 1..3 run (and hold memory) for those two rows only.
    for p in PROMPTS[2:4]:
        engine.add_request([engine.encode(p)], GREEDY, loops=4)
    engine.step()  # prefill of the newcomers
    calls = []
    update = pool.update
    monkeypatch.setattr(pool, "update", lambda k, v, i, kw: calls.append((kw["stage"], kw["iteration"], k.shape[0])) or update(k, v, i, kw))
    engine.step()  # one decode step of the mixed batch
    assert [s.loops for s in pool.rows] == [4, 4, 1, 1]
    core = {(t, n) for stage, t, n in calls if stage == "core"}
    assert core == {(0, 4), (1, 2), (2, 2), (3, 2)}
    assert {n for stage, _, n in calls if stage != "core"} == {4}
    assert all(pool.tier_rows(t) == 2 for t in range(1, 4)) and pool.tier_rows(0) == 4
    monkeypatch.undo()
    run_all(engine)


def test_pool_row_moves_keep_each_sequences_kv(engine):
    """Random joins and leaves: every row's K/V stays its own after the swaps that keep depth order."""
    cfg = engine.model.config
    pool = KVPool(cfg, budget_bytes=1 << 30, max_rows=16, max_len=64)
    rng = random.Random(1)
    live: list[Sequence] = []
    with torch.inference_mode():
        for _ in range(200):
            if live and (len(live) == 16 or rng.random() < 0.45):
                seq = live.pop(rng.randrange(len(live)))
                pool.remove(seq)
            else:
                seq = Sequence([1, 2, 3], GREEDY, rng.randint(1, 4))
                pool.insert(seq)
                seq.num_cached = rng.randint(1, 8)
                for t in range(seq.loops):  # stamp this sequence's id into all its K/V
                    pool.bufs[t][:, :, seq.row, :, : seq.num_cached] = seq.id
                live.append(seq)
            assert [s.loops for s in pool.rows] == sorted((s.loops for s in pool.rows), reverse=True)
            assert sorted(s.id for s in pool.rows) == sorted(s.id for s in live)
            for s in live:
                for t in range(s.loops):
                    assert bool((pool.bufs[t][:, :, s.row, :, : s.num_cached] == s.id).all())
            for t in range(cfg.max_loops):  # a tier exists only while some row uses it
                assert (pool.bufs[t] is None) == (pool.tier_rows(t) == 0)
    assert pool.reserved == sum(pool.bytes_needed(s) for s in live)


def test_admission_against_the_kv_byte_budget(ckpt):
    probe = Engine(EngineConfig(model=ckpt), metrics=False)
    ids = probe.encode(PROMPTS[0])
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    need4 = probe.pool.bytes_per_token(4) * (len(ids) + params.max_tokens)
    # A budget for exactly two depth-4 requests: N(1) = 3 and N(4) = 6 layer applications, so four depth-1 ones.
    eng = Engine(EngineConfig(model=ckpt, kv_cache_mb=2 * need4 / 2**20, max_batch_size=8), metrics=False)
    for loops, allowed in ((4, 2), (1, 4)):
        seqs = eng.add_request([ids] * 6, params, loops=loops)
        peak = 0
        while eng.has_work():
            eng.step()
            peak = max(peak, len(eng.pool.rows))
            assert eng.pool.reserved <= eng.pool.budget and eng.pool.usage <= 1.0
        assert peak == allowed, loops
        assert all(s.finish_reason == "length" for s in seqs)
        assert eng.pool.usage == 0.0
    with pytest.raises(RequestError) as e:  # needs more than the whole budget: can never run
        eng.add_request([ids], SamplingParams(max_tokens=40), loops=4)
    assert e.value.param == "max_tokens" and "KV cache" in str(e.value)


def test_max_batch_size_bounds_the_running_batch(ckpt):
    eng = Engine(EngineConfig(model=ckpt, max_batch_size=3, max_num_batched_tokens=64), metrics=False)
    seqs = eng.add_request([eng.encode(p) for p in PROMPTS], GREEDY, loops=2)
    peak = 0
    while eng.has_work():
        eng.step()
        peak = max(peak, len(eng.pool.rows))
    assert peak == 3 and all(s.finish_reason == "length" for s in seqs)


def test_prefill_token_budget_splits_admission(ckpt):
    eng = Engine(EngineConfig(model=ckpt, max_num_batched_tokens=8), metrics=False)
    eng.add_request([[5, 6, 7, 8, 9]] * 3, GREEDY, loops=1)
    started = []  # sequences that got their first token, per step
    while eng.has_work():
        started.append(sum(len(o.seq.output_ids) == 1 for o in eng.step()))
    assert started[:4] == [1, 1, 1, 0], "each 5-token prompt is its own prefill under an 8-token budget"


def test_seeded_sampling_is_independent_of_the_batch(engine):
    P = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], P, loops=3)[0].token_ids
    assert engine.generate([PROMPTS[0]], P, loops=3)[0].token_ids == alone
    # Inside a busy mixed-depth batch, joining after others have started:
    busy = engine.add_request([engine.encode(p) for p in PROMPTS[1:]], SamplingParams(temperature=1.0, max_tokens=20), loops=4)
    busy += engine.add_request([engine.encode(p) for p in PROMPTS[1:]], SamplingParams(temperature=1.0, max_tokens=20), loops=1)
    engine.step()
    engine.step()
    (seeded,) = engine.add_request([engine.encode(PROMPTS[0])], P, loops=3)
    run_all(engine)
    assert seeded.output_ids == alone
    assert engine.generate([PROMPTS[0]], SamplingParams(**{**P.__dict__, "seed": 99}), loops=3)[0].token_ids != alone
    a, b = engine.generate([PROMPTS[0]], P, loops=3, n=2)
    assert a.token_ids == alone and b.token_ids != alone, "choice i draws from seed + i"


def test_end_of_text_stops_unless_ignored(ckpt):
    """A model whose every next token is <|endoftext|>: generation stops at once, with no text."""
    eng = Engine(EngineConfig(model=ckpt), metrics=False)
    m, eos = eng.model, eng.eos_token_id
    with torch.no_grad():  # final norm -> the constant b, and the eos row of the head aligned with it
        b = torch.randn(m.config.hidden_size)
        m.final_layer_norm.weight.zero_()
        m.final_layer_norm.bias.copy_(b)
        m.embed_out.weight[eos] = 100 * b
    out = eng.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8))[0]
    assert (out.token_ids, out.text, out.finish_reason) == ([eos], "", "stop")
    out = eng.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert (out.token_ids, out.finish_reason) == ([eos] * 8, "length")


def test_stop_strings_cut_the_text(engine):
    full = engine.generate(["First Citizen:"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), loops=1)[0]
    text = full.text
    stop = text[5:8]
    assert len(text) > 10 and stop.strip() and text.find(stop) == 5
    out = engine.generate(["First Citizen:"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=("zzz", stop)), loops=1)[0]
    assert out.text == text[:5] and out.finish_reason == "stop"
    assert len(out.token_ids) < len(full.token_ids) and out.token_ids == full.token_ids[: len(out.token_ids)]


def test_abort_frees_the_row_at_the_next_step(engine):
    seqs = engine.add_request([engine.encode(PROMPTS[0])] * 2, SamplingParams(temperature=0, max_tokens=50), loops=4)
    engine.step()
    engine.step()
    assert len(engine.pool.rows) == 2 and engine.pool.reserved > 0
    engine.abort(seqs[:1])
    outs = engine.step()
    assert [o.finish_reason for o in outs if o.seq is seqs[0]] == ["abort"]
    assert engine.pool.rows == [seqs[1]] and engine.pool.reserved == engine.pool.bytes_needed(seqs[1])
    engine.abort(seqs[1:])
    engine.step()
    assert engine.pool.rows == [] and engine.pool.reserved == 0 and not engine.has_work()


def test_non_finite_logits_fail_only_their_own_row(ckpt, refs):
    """A poisoned token (NaN embedding) makes its own sequence's logits NaN: that sequence fails with an
    error, and the others in the same batch finish with their normal text."""
    eng = Engine(EngineConfig(model=ckpt), metrics=False)
    used = {t for p in PROMPTS for t in eng.encode(p)} | {t for r in refs.values() for t in r[0]}
    poison = next(t for t in range(eng.vocab_size - 1, 0, -1) if t not in used)
    with torch.no_grad():
        eng.model.embed_in.weight[poison] = float("nan")
    good = eng.add_request([eng.encode(p) for p in PROMPTS[:3]], GREEDY, loops=2)
    (bad,) = eng.add_request([eng.encode(PROMPTS[0]) + [poison]], GREEDY, loops=3)  # same prefill batch
    outs = []
    while eng.has_work():
        outs += eng.step()
    (failed,) = [o for o in outs if o.seq is bad]
    assert failed.finish_reason == "error" and "non-finite" in failed.error and bad.output_ids == []
    for p, seq in zip(PROMPTS, good):
        assert seq.finish_reason == "length" and same_greedy(seq.output_ids, refs[(p, 2)])
    assert eng.pool.rows == [] and eng.pool.reserved == 0


def test_logprobs_match_the_model(engine):
    ids = engine.encode(PROMPTS[2])
    (seq,) = engine.add_request([ids], SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=True), loops=2)
    outs = []
    while engine.has_work():
        outs += [o for o in engine.step() if o.seq is seq]
    full = torch.tensor([ids + seq.output_ids[:-1]])
    with torch.no_grad():
        lp = engine.model(full, loops=2).logits[0].log_softmax(-1)  # (T, V)
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(ids)
    for i in range(1, len(ids)):
        chosen, top = seq.prompt_logprobs[i]
        assert chosen == pytest.approx(lp[i - 1, ids[i]].item(), abs=1e-4)
        assert [t for t, _ in top] == lp[i - 1].topk(3).indices.tolist()
    for j, out in enumerate(outs):
        (chosen, top), = out.logprobs
        row = lp[len(ids) - 1 + j]
        assert chosen == pytest.approx(row[out.token_ids[0]].item(), abs=1e-4)
        assert top[0][0] == out.token_ids[0] == row.argmax().item()  # greedy: the top token is the chosen one
        assert len(top) == 3


def test_request_validation(engine):
    ids = engine.encode(PROMPTS[0])
    for prompts, params, loops, param in [
        ([ids], GREEDY, 5, "loops"),
        ([ids], GREEDY, 0, "loops"),
        ([[]], GREEDY, None, "prompt"),
        ([[engine.vocab_size]], GREEDY, None, "prompt"),
        ([list(range(1, 300))], GREEDY, None, "prompt"),  # longer than max_model_len 256
        ([ids], SamplingParams(max_tokens=256), None, "max_tokens"),  # prompt + max_tokens > 256
    ]:
        with pytest.raises(RequestError) as e:
            engine.add_request(prompts, params, loops)
        assert e.value.param == param
    assert not engine.has_work()
    with pytest.raises(ValueError):
        SamplingParams(logprobs=6)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(stop=("x",), detokenize=False)


# ---- sampling functions ------------------------------------------------------------------------
def test_top_k_top_p_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3)
    out = apply_top_k_top_p(logits, torch.tensor([2, 4, 4]), torch.tensor([1.0, 0.7, 0.5]))
    inf = float("-inf")
    # softmax([3, 2, 1, 0]) = [.64, .24, .09, .03]: p=0.7 keeps the top two, p=0.5 the top one
    assert out.tolist() == [[inf, 3.0, inf, 2.0], [inf, 3.0, inf, 2.0], [inf, 3.0, inf, inf]]
    assert apply_top_k_top_p(logits, None, None) is logits


def test_exponential_race_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = exponential_race(probs.expand(6000, 4).clone(), [g] * 6000)
    freq = torch.bincount(draws, minlength=4).float() / 6000
    assert torch.allclose(freq, probs, atol=0.03) and freq[3] == 0


def test_sample_mixes_greedy_and_seeded_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.0, top_k=1, seed=6)]
    def draw():
        return sample(logits, BatchSampling.build(params, [p.generator("cpu") for p in params], 50, "cpu"))
    a, b = draw(), draw()
    assert a.tolist() == b.tolist(), "same seeds, same draws"
    assert a[0] == logits[0].argmax() and a[2] == logits[2].argmax(), "greedy and top_k=1 rows take the argmax"


# ---- detokenizer ---------------------------------------------------------------------------------
def test_incremental_detokenizer_handles_multibyte_characters(engine):
    text = LINES[4]  # accents, CJK and an emoji: several byte-level tokens per character
    ids = engine.encode(text)
    assert len(ids) > len(text.split())
    d = Detokenizer(engine.decode, [], ())
    deltas = []
    for t in ids:
        d.add(t)
        deltas.append(d.delta(final=False))
    deltas.append(d.delta(final=True))
    assert "".join(deltas) == engine.decode(ids) == text
    assert not any("\ufffd" in x for x in deltas)


def test_detokenizer_stop_string_spanning_tokens_is_held_back(engine):
    text = "To be, or not to be, that is the question"
    ids = engine.encode(text)
    d = Detokenizer(engine.decode, [], ("not to",))
    sent, stopped = [], False
    for t in ids:
        stopped = d.add(t)
        if stopped:
            break
        sent.append(d.delta(final=False))
        assert "not" not in "".join(sent), "a possible start of the stop string is held back"
    assert stopped
    sent.append(d.delta(final=True))
    assert "".join(sent) == "To be, or "
