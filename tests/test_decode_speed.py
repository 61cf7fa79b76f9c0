"""The decode-speed paths: torch.compile'd decode graphs (--compile) give the same greedy tokens as the
eager engine (and so as generate()) on CPU, for each depth and a padded batch bucket, drafts of a
speculation round included, and batches a graph does not cover still decode eagerly; the CPU paged
attention kernel equals gather + SDPA; a bfloat16 K/V pool holds twice the tokens at the same quality.

A tiny random checkpoint (tests/server_fixtures.py); each graph costs a few seconds of compile here.
"""

from __future__ import annotations

import pytest

from server import Engine, EngineConfig, SamplingParams
from server.engine.compiled import bucket, resolve_mode
from server_fixtures import build_checkpoint, reference_greedy, same_greedy, one_torch_thread  # noqa: F401 (autouse fixture)

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = ["First Citizen:", "All: Speak", "To be, or not to be"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny"))  # 1+1R2+1 mesh, max_loops 4, default loops 2


@pytest.fixture(scope="module")
def engines(ckpt):
    eager = Engine(EngineConfig(model=ckpt, max_batch_size=4, compile="off"), metrics=False)
    compiled = Engine(EngineConfig(model=ckpt, max_batch_size=4, compile="on"), metrics=False)
    return eager, compiled


def test_compiled_greedy_equals_eager_and_generate(engines):
    eager, compiled = engines
    graphs = compiled.runner.compiled
    assert graphs.ready(1, compiled.model.config.default_loops)  # the default depth's batch-1 graph, at start
    graphs.max_batch = 4  # CPU compiles buckets 1-2 only; 4 tests a bucket with a padding row
    for k in (1, 3):
        graphs.warm_up(k, (1, 3))  # batch 3 runs in the bucket of 4: one padding row
    before = graphs.steps
    for k in (1, 3):
        for batch in (PROMPTS[:1], PROMPTS):
            want = eager.generate(batch, GREEDY, loops=k)
            got = compiled.generate(batch, GREEDY, loops=k)
            assert [g.token_ids for g in got] == [w.token_ids for w in want], (k, len(batch))
        ref = reference_greedy(compiled.model, compiled.encode(PROMPTS[0]), k, GREEDY.max_tokens)
        assert same_greedy(compiled.generate(PROMPTS[:1], GREEDY, loops=k)[0].token_ids, ref), k
    # three runs per depth, a graph for every decode step (the first token comes from the prompt's pass)
    assert graphs.steps - before == 2 * 3 * (GREEDY.max_tokens - 1)


def test_mixed_depth_batch_decodes_eagerly_with_the_same_tokens(engines):
    eager, compiled = engines
    graphs = compiled.runner.compiled
    before = graphs.steps
    seqs = {k: compiled.add_request([compiled.encode(PROMPTS[k - 1])], GREEDY, loops=k)[0] for k in (1, 2, 3)}
    while compiled.has_work():
        compiled.step()
    assert graphs.steps == before  # rows of three depths share each step: no one-depth graph covers it
    for k, seq in seqs.items():
        assert seq.output_ids == eager.generate([PROMPTS[k - 1]], GREEDY, loops=k)[0].token_ids


def test_speculation_drafts_and_verify_passes_run_in_graphs_with_identical_tokens(engines):
    eager, compiled = engines  # the same model object: the graphs compiled above serve this engine too
    spec = Engine(EngineConfig(speculative_loops=1, num_speculative_tokens=2, compile="on"), model=compiled.model,
                  tokenizer=compiled.tokenizer, metrics=False)
    graphs = spec.runner.compiled
    graphs.warm_up(1)  # the drafts' decode steps at depth 1
    graphs.warm_up(3, (1,), t0=1, T=2)  # the verify pass: iterations 1..2 and the coda for 2 drafts
    got = spec.generate(PROMPTS[:1], GREEDY, loops=3)[0].token_ids
    assert got == eager.generate(PROMPTS[:1], GREEDY, loops=3)[0].token_ids
    seq = spec.add_request([spec.encode(PROMPTS[1])], GREEDY, loops=3)[0]
    while spec.has_work():
        spec.step()
    assert seq.num_drafted > 0 and seq.output_ids == eager.generate(PROMPTS[1:2], GREEDY, loops=3)[0].token_ids
    # the drafts and the verify passes of both requests ran in graphs
    assert graphs.runs["decode"] >= seq.num_drafted and graphs.runs["verify"] >= seq.num_drafted // 2


def test_compile_setting_is_checked_and_buckets_pad_up():
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        EngineConfig(compile="yes")
    import torch

    assert resolve_mode("off", torch.device("cpu")) == (False, 0)
    assert resolve_mode("auto", torch.device("cuda"))[0] is True
    assert [bucket(n) for n in (1, 2, 3, 5, 33)] == [1, 2, 4, 8, 64]


def test_bfloat16_kv_pool_holds_twice_the_tokens_and_keeps_the_logprobs(ckpt):
    import torch

    fp32 = Engine(EngineConfig(model=ckpt, kv_cache_mb=4, compile="off"), metrics=False)
    bf16 = Engine(EngineConfig(model=ckpt, kv_cache_mb=4, kv_cache_dtype="bfloat16", compile="off"), metrics=False)
    assert bf16.kv.kv.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.float32
    assert bf16.kv.kernel is not None  # decode attention reads the bfloat16 blocks in place
    assert bf16.blocks.num_units == 2 * fp32.blocks.num_units
    ids = bf16.encode(PROMPTS[2])
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=1, ignore_eos=True)
    (seq,) = bf16.add_request([ids], params, loops=3)
    outs = []
    while bf16.has_work():
        outs += bf16.step()
    full = torch.tensor([ids + seq.output_ids[:-1]])
    with torch.no_grad():
        lp = bf16.model(full, loops=3).logits[0].log_softmax(-1)  # float32 K/V throughout
    for j, out in enumerate(outs):
        (chosen, _), = out.logprobs
        # K/V rounded to bfloat16 (8 bits of mantissa) move a log-probability by far less than 0.05
        assert chosen == pytest.approx(lp[len(ids) - 1 + j, out.token_ids[0]].item(), abs=0.05), j


@pytest.mark.parametrize("pool_dtype", ["float32", "bfloat16"])
def test_paged_attention_kernel_equals_gather_and_sdpa(pool_dtype):
    import torch

    from server.engine.paged_attention import load

    kernel = load()
    assert kernel is not None  # g++ is on this project's machines; MESH_PAGED_KERNEL=0 would turn it off
    torch.manual_seed(0)
    U, bs, nh, hs, n, nb, T = 40, 4, 2, 8, 3, 5, 3
    dt = getattr(torch, pool_dtype)
    k_pool, v_pool = torch.randn(U, bs, nh, hs).to(dt), torch.randn(U, bs, nh, hs).to(dt)
    units = torch.randperm(U)[: n * nb].view(n, nb)  # scattered blocks, in table order
    lengths = torch.tensor([[1, 2, 3], [7, 8, 9], [18, 19, 20]])  # (n, T): causal queries of a verify pass
    q = torch.randn(n, T, nh, hs)
    got = kernel.decode(q, k_pool, v_pool, units, lengths, hs ** -0.5)
    keys = k_pool[units].reshape(n, nb * bs, nh, hs).transpose(1, 2).float()  # (n, nh, S, hs)
    values = v_pool[units].reshape(n, nb * bs, nh, hs).transpose(1, 2).float()
    visible = torch.arange(nb * bs)[None, None, :] < lengths[:, :, None]  # (n, T, S)
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=visible[:, None])
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)
