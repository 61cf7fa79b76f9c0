"""The serving engine without HTTP: greedy == MeshForCausalLM.generate at every depth, continuous
mixed-depth batching, the paged depth-tiered K/V pool (rows skip iterations they do not need, memory by
depth, a hard cap), chunked prefill, preemption, prefix caching, n > 1 sharing, allocation and forward
faults, seeded sampling independent of the batch, stop strings / end-of-text, aborts, prompt logprobs,
and the sampling and detokenizer functions.

A tiny random checkpoint (tests/server_fixtures.py) on CPU; the engine is stepped in the test's thread.
"""

from __future__ import annotations

import random

import pytest
import torch

from server import Engine, EngineConfig, SamplingParams
from server.engine.detokenizer import Detokenizer
from server.engine import RequestError
from server.engine.block_manager import BlockManager
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
    """Requests of random depths join while others decode and leave when done; every sequence still
    produces generate()'s tokens, and all blocks are free at the end."""
    rng = random.Random(0)
    jobs = [(p, rng.randint(1, 4)) for p in PROMPTS * 3]
    started, seen_depths, steps = [], set(), 0
    while jobs or engine.has_work():
        if jobs and rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):  # sometimes several join in one step
                if jobs:
                    p, k = jobs.pop()
                    started += [(p, k, s) for s in engine.add_request([engine.encode(p)], GREEDY, loops=k)]
        engine.step()
        steps += 1
        seen_depths.add(tuple(sorted({s.loops for s in engine.scheduler.running})))
    assert max(len(d) for d in seen_depths) >= 3, "the batch never mixed depths"
    assert steps < len(started) * GREEDY.max_tokens, "no batching happened"
    for p, k, seq in started:
        assert same_greedy(seq.output_ids, refs[(p, k)]), (p, k)
    assert engine.scheduler.running == [] and engine.blocks.num_used == 0


def test_shallow_rows_skip_deep_iterations_and_hold_no_deep_kv(engine, monkeypatch):
    cfg, blocks = engine.model.config, engine.blocks
    for k in range(1, 5):
        assert blocks.units_per_block(k) == cfg.num_layer_applications(k)
        assert engine.kv.unit_bytes(cfg, blocks.block_size, torch.float32) * blocks.units_per_block(k) == \
            engine.model.kv_bytes_per_token(k) * blocks.block_size
    shallow = [engine.add_request([engine.encode(p)], GREEDY, loops=1)[0] for p in PROMPTS[:2]]
    deep = [engine.add_request([engine.encode(p)], GREEDY, loops=4)[0] for p in PROMPTS[2:4]]
    engine.step()  # the prompts, as chunks
    for seq in shallow + deep:  # a depth-K row holds N(K) units per block of tokens, nothing for deeper tiers
        assert len(blocks.units_of(seq)) == len(seq.blocks[0]) * cfg.num_layer_applications(seq.loops)
        assert len(seq.blocks) == 2 + seq.loops  # prelude, iterations 0..K-1, its coda
    calls = []
    attend = engine.kv.attend
    monkeypatch.setattr(engine.kv, "attend", lambda q, k, v, kw: calls.append((kw["stage"], kw["iteration"], q.shape[0])) or attend(q, k, v, kw))
    engine.step()  # one decode step of the mixed batch: rows sorted deepest first
    core = {(t, n) for stage, t, n in calls if stage == "core"}
    assert core == {(0, 4), (1, 2), (2, 2), (3, 2)}
    assert {n for stage, _, n in calls if stage != "core"} == {4}
    monkeypatch.undo()
    run_all(engine)


def test_block_pool_accounting_under_random_load(engine):
    """Random allocations, prefix matches and frees: every unit is free, cached or held, never twice; held
    units belong to live sequences; shared blocks are counted once."""
    cfg = engine.model.config
    bm = BlockManager(cfg, num_units=200, block_size=4, max_model_len=64)
    rng = random.Random(1)
    live: list[Sequence] = []
    for _ in range(300):
        if live and (len(live) == 12 or rng.random() < 0.4):
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            seq = Sequence([rng.randint(1, 3) for _ in range(rng.randint(1, 20))], GREEDY, rng.randint(1, 4))
            bm.match_prefix(seq)
            if bm.allocate(seq, seq.num_tokens - seq.num_computed):
                seq.num_computed = seq.num_tokens
                bm.commit(seq)
                live.append(seq)
            else:
                bm.free(seq)
        held = {u for s in live for u in bm.units_of(s)}
        cached = [u for b in bm.cached.values() for u in b.units]
        assert len(set(bm.free_units)) == len(bm.free_units)
        assert not held & set(bm.free_units) and not held & set(cached) and not set(cached) & set(bm.free_units)
        assert len(held) + len(cached) + len(bm.free_units) == 200 and bm.num_used == len(held)
        for s in live:  # each sequence's table names its own blocks' units, tier by tier
            for (_, first, n), tier in zip(bm._tiers[s.loops], s.blocks):
                assert s.table[first : first + n, : len(tier)].T.tolist() == [b.units for b in tier]


def test_the_pool_is_a_hard_cap_and_admission_takes_blocks_needed_now(ckpt):
    """A 0.25 MiB pool (64 units of 16 tokens: N(4) = 6 units a block, N(1) = 3) under a mixed load of
    requests whose prompt + max_tokens alone would exceed it many times: the pool tensor is the only K/V
    memory, used units never exceed it, more sequences run at once than prompt + max_tokens reservations
    would allow, preempted rows resume, and every output still equals generate()'s."""
    eng = Engine(EngineConfig(model=ckpt, kv_cache_mb=0.25, max_batch_size=16, max_num_batched_tokens=32), metrics=False)
    assert eng.kv.nbytes <= 0.25 * 2**20 and eng.blocks.num_units == 64
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    seqs = [s for k in (4, 1, 3, 2) for s in eng.add_request([eng.encode(p) for p in PROMPTS[:4]], params, loops=k)]
    streamed = {s.id: [] for s in seqs}
    peak = 0
    while eng.has_work():
        for out in eng.step():
            streamed[out.seq.id] += out.token_ids
        assert eng.blocks.num_used <= eng.blocks.num_units
        peak = max(peak, len(eng.scheduler.running))
    reserved = sum(-(-(len(s.prompt_ids) + 60) // 16) * eng.blocks.units_per_block(s.loops) for s in seqs) / len(seqs)
    assert peak > 64 / reserved, "admission reserved prompt + max_tokens"
    assert sum(s.num_preemptions for s in seqs) > 0, "the load never ran out of blocks"
    for s in seqs:
        assert streamed[s.id] == s.output_ids and len(s.output_ids) == 60, "a preempted stream lost or repeated tokens"
        assert same_greedy(s.output_ids, reference_greedy(eng.model, s.prompt_ids, s.loops, 60))
    assert eng.blocks.num_used == 0
    with pytest.raises(RequestError) as e:  # more than the whole pool: a clear error, never a preemption loop
        eng.add_request([eng.encode(PROMPTS[0])], SamplingParams(max_tokens=180), loops=4)
    assert e.value.param == "max_tokens" and "whole pool" in str(e.value)


def test_max_batch_size_bounds_the_running_batch(ckpt):
    eng = Engine(EngineConfig(model=ckpt, max_batch_size=3, max_num_batched_tokens=64), metrics=False)
    seqs = eng.add_request([eng.encode(p) for p in PROMPTS], GREEDY, loops=2)
    peak = 0
    while eng.has_work():
        eng.step()
        peak = max(peak, len(eng.scheduler.running))
    assert peak == 3 and all(s.finish_reason == "length" for s in seqs)


def test_chunked_prefill_keeps_running_streams_going(ckpt):
    """Under a 16-token step budget a 100-token prompt is split into chunks while a running stream gets a
    token every step; both outputs equal generate()'s."""
    eng = Engine(EngineConfig(model=ckpt, max_num_batched_tokens=16, max_batch_size=4), metrics=False)
    (stream,) = eng.add_request([eng.encode(PROMPTS[1])], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), loops=2)
    eng.step()
    eng.step()
    long_ids = (eng.encode(" ".join(LINES)) * 2)[:100]
    (long,) = eng.add_request([long_ids], GREEDY, loops=3)
    steps = 0
    while not long.output_ids:
        before = len(stream.output_ids)
        eng.step()
        steps += 1
        assert len(stream.output_ids) == before + 1, "the running stream missed a step"
    assert steps == -(-100 // 15), "the prompt took 15 tokens a step beside the stream's one"
    run_all(eng)
    assert same_greedy(long.output_ids, reference_greedy(eng.model, long_ids, 3, GREEDY.max_tokens))
    assert same_greedy(stream.output_ids, reference_greedy(eng.model, stream.prompt_ids, 2, 40))
    # A 2-token budget beside one stream: the prompt comes one token a step, and a one-token piece of a
    # prompt computes K/V without sampling anything.
    eng = Engine(EngineConfig(model=ckpt, max_num_batched_tokens=2, max_batch_size=2), metrics=False)
    (stream,) = eng.add_request([eng.encode(PROMPTS[0])], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), loops=1)
    eng.step()
    (slow,) = eng.add_request([eng.encode(PROMPTS[3])], GREEDY, loops=4)
    run_all(eng)
    assert same_greedy(slow.output_ids, reference_greedy(eng.model, slow.prompt_ids, 4, GREEDY.max_tokens))


def test_prefix_cache_hits_give_the_same_output(ckpt):
    """A second request sharing a 64-token prefix computes only the rest: same greedy tokens, same
    logprobs. Prelude and iteration blocks are keyed without depth, the coda with it: a request at another
    depth gets no hit (its coda K/V differ), and one asking for prompt logprobs computes everything."""
    eng = Engine(EngineConfig(model=ckpt, max_num_batched_tokens=256), metrics=False)
    hits = []
    on_admit = eng.scheduler.on_admit
    eng.scheduler.on_admit = lambda s, q, h: hits.append(h) or on_admit(s, q, h)
    prefix = (eng.encode(" ".join(LINES)) * 2)[:64]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    cold = eng.generate([prefix + eng.encode(" All: Speak")], params, loops=3)[0]
    warm = eng.generate([prefix + eng.encode(" All: Speak")], params, loops=3)[0]
    assert hits == [0, 64]
    assert warm.token_ids == cold.token_ids
    for (a, _), (b, _) in zip(cold.logprobs, warm.logprobs):
        assert a == pytest.approx(b, abs=1e-5)
    eng.generate([prefix + eng.encode(" First")], params, loops=2)
    echo = SamplingParams(temperature=0, max_tokens=2, logprobs=1, prompt_logprobs=True)
    (seq,) = eng.add_request([prefix + eng.encode(" All")], echo, loops=3)
    run_all(eng)
    assert hits[2:] == [0, 0] and len(seq.prompt_logprobs) == 64 + len(eng.encode(" All"))


def test_n_choices_share_the_prompt_blocks(ckpt):
    eng = Engine(EngineConfig(model=ckpt, enable_prefix_caching=False), metrics=False)
    ids = eng.encode(" ".join(LINES))[:40]
    a, b = eng.add_request([ids], SamplingParams(temperature=1.0, seed=3, max_tokens=5, ignore_eos=True), loops=2, n=2)
    while not b.output_ids:
        eng.step()
    shared = [x is y for x, y in zip(a.blocks[0], b.blocks[0])]
    assert shared == [True, True, False]  # the two full blocks of 16 tokens; the partial third is each one's own
    run_all(eng)
    assert eng.blocks.num_used == 0


def test_allocation_faults_fail_only_their_sequence(ckpt, refs, monkeypatch):
    """An exception while taking units (fault injection) ends that one sequence with an error; the pool
    stays consistent and the other sequences finish with generate()'s text."""
    eng = Engine(EngineConfig(model=ckpt, max_num_batched_tokens=64), metrics=False)
    real, calls = BlockManager._take_unit, [0]

    def take_unit(self):
        calls[0] += 1
        if calls[0] == 10:
            raise MemoryError("injected allocation fault")
        return real(self)

    monkeypatch.setattr(BlockManager, "_take_unit", take_unit)
    seqs = [eng.add_request([eng.encode(p)], GREEDY, loops=2)[0] for p in PROMPTS[:4]]
    outs = []
    while eng.has_work():
        outs += eng.step()
    failed = [o for o in outs if o.finish_reason == "error"]
    assert len(failed) == 1 and "injected allocation fault" in failed[0].error
    for p, seq in zip(PROMPTS, seqs):
        if seq is not failed[0].seq:
            assert seq.finish_reason == "length" and same_greedy(seq.output_ids, refs[(p, 2)])
    bm = eng.blocks
    assert bm.num_used == 0 and len(set(bm.free_units)) == len(bm.free_units) == bm.num_units - bm.num_cached_units


def test_a_raising_forward_is_retried_row_by_row(engine, refs, monkeypatch):
    """The model raises whenever one poisoned sequence is in the batch: the step is retried row by row,
    only that sequence fails, and the rows beside it finish with generate()'s tokens."""
    real = engine.runner.run
    seqs = [engine.add_request([engine.encode(p)], GREEDY, loops=3)[0] for p in PROMPTS[:3]]
    bad = seqs[1]

    def run(rows):
        if any(s is bad for s, _ in rows) and bad.num_computed > len(bad.prompt_ids) + 2:
            raise RuntimeError("injected forward fault")
        return real(rows)

    monkeypatch.setattr(engine.runner, "run", run)
    outs = []
    while engine.has_work():
        outs += engine.step()
    (failed,) = [o for o in outs if o.finish_reason == "error"]
    assert failed.seq is bad and "injected forward fault" in failed.error and len(bad.output_ids) == 4
    for p, seq in zip(PROMPTS, seqs):
        if seq is not bad:
            assert same_greedy(seq.output_ids, refs[(p, 3)])


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
    # min_tokens: no stop string ends the text before that many tokens
    keep = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,), min_tokens=24)
    out = engine.generate(["First Citizen:"], keep, loops=1)[0]
    assert (out.token_ids, out.text, out.finish_reason) == (full.token_ids, text, "length")


def test_abort_frees_the_row_at_the_next_step(engine):
    seqs = engine.add_request([engine.encode(PROMPTS[0])] * 2, SamplingParams(temperature=0, max_tokens=50), loops=4)
    engine.step()
    engine.step()
    assert engine.scheduler.running == seqs and engine.blocks.num_used > 0
    engine.abort(seqs[:1])
    outs = engine.step()
    assert [o.finish_reason for o in outs if o.seq is seqs[0]] == ["abort"]
    assert engine.scheduler.running == [seqs[1]] and engine.blocks.num_used == len(engine.blocks.units_of(seqs[1]))
    engine.abort(seqs[1:])
    engine.step()
    assert engine.scheduler.running == [] and engine.blocks.num_used == 0 and not engine.has_work()


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
    assert eng.scheduler.running == [] and eng.blocks.num_used == 0


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
