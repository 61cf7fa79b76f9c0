"""The MeSH model: incremental decoding == full forward, mixed depths, generate(), save/load,
the one-hot-router identity, config/loops validation, parameter counts and KV bytes.

Tiny configs on CPU. ``initializer_range=0.2`` makes random models' logits far from uniform, so
greedy choices are well separated and different depths really produce different text.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import model  # noqa: F401  (registers model_type "mesh" with the Auto classes)
from model import MeshCache, MeshConfig, MeshForCausalLM
from model.modeling import rotary_cos_sin

VOCAB = 61
DIMS = dict(
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    initializer_range=0.2,
)
MAX_LOOPS = 3
RECURSIVE = ("base", "residual", "anchor", "anchor_emb", "mesh")
# (layout, scheme, loops, extra config): every scheme at every K, the vanilla model, and one
# sequential-residual, scaled-embedding MeSH variant.
CASES = [("3", "vanilla", 1, {})]
CASES += [("1+1R2+1", s, k, {}) for s in RECURSIVE for k in range(1, MAX_LOOPS + 1)]
CASES += [("1+2R2+1", "mesh", 2, {"use_parallel_residual": False, "scale_embeddings": True, "rotary_pct": 1.0})]


def case_id(case):
    layout, scheme, k, extra = case
    return f"{scheme}-{layout}-K{k}" + ("-" + "-".join(extra) if extra else "")


def build(layout: str = "1+1R2+1", scheme: str = "mesh", seed: int = 0, **extra) -> MeshForCausalLM:
    torch.manual_seed(seed)
    kw = dict(DIMS, **extra)
    if scheme == "vanilla":
        cfg = MeshConfig.from_layout(layout, **kw)
    else:
        cfg = MeshConfig.from_layout(layout, scheme=scheme, **{"max_loops": MAX_LOOPS, **kw})
    return MeshForCausalLM(cfg).eval()


def rand_ids(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor], pad: int = 0):
    """(B, T) ids and 2D mask for rows of different lengths, padded on the left."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :], mask[b, T - len(r) :] = r, 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Incremental decoding == full forward
# ---------------------------------------------------------------------------------------------
def decode_errors(layout, scheme, k, extra) -> dict[str, float]:
    """Max |logits difference| of token-by-token and chunked prefill decoding against one full forward.

    Also checks that the incremental and full-recompute greedy continuations agree (returns them).
    """
    m = build(layout, scheme, **extra)
    ids = rand_ids(2, 10)
    with torch.no_grad():
        full = m(ids, loops=k, use_cache=False).logits  # (2, 10, V)

        cache = MeshCache(m.config, k)  # grows geometrically
        steps = [m(ids[:, :4], cache=cache, loops=k).logits]
        steps += [m(ids[:, i : i + 1], cache=cache, loops=k).logits for i in range(4, 10)]
        stepwise = torch.cat(steps, dim=1)

        cache = MeshCache(m.config, k, max_cache_len=16)  # preallocated
        chunks = [m(ids[:, a:b], cache=cache, loops=k).logits for a, b in ((0, 3), (3, 8), (8, 10))]
        chunked = torch.cat(chunks, dim=1)

        # Greedy continuation: cached decoding vs recomputing the whole sequence every step.
        cache, seq_c, seq_f = MeshCache(m.config, k), ids.clone(), ids.clone()
        logits = m(ids, cache=cache, loops=k).logits
        for _ in range(6):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq_c = torch.cat((seq_c, nxt), 1)
            logits = m(nxt, cache=cache, loops=k).logits
            seq_f = torch.cat((seq_f, m(seq_f, loops=k, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(full.argmax(-1), stepwise.argmax(-1))
    assert torch.equal(full.argmax(-1), chunked.argmax(-1))
    assert torch.equal(seq_c, seq_f)
    return {"stepwise": (full - stepwise).abs().max().item(), "chunked": (full - chunked).abs().max().item()}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_decode_matches_full_forward(case):
    errs = decode_errors(*case)
    assert max(errs.values()) <= 1e-4, errs


def report_decode_errors() -> float:
    """Prints the error per case and returns the max (for the closing note; see README)."""
    worst = 0.0
    for case in CASES:
        errs = decode_errors(*case)
        worst = max(worst, *errs.values())
        print(f"{case_id(case):40s} stepwise {errs['stepwise']:.2e}  chunked {errs['chunked']:.2e}")
    print(f"max |dlogits| over all cases: {worst:.2e}")
    return worst


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_left_padded_batch_decodes_like_each_row_alone(case):
    layout, scheme, k, extra = case
    m = build(layout, scheme, **extra)
    rows = [rand_ids(7, seed=2), rand_ids(4, seed=3), rand_ids(6, seed=4)]
    ids, mask = left_pad(rows)
    T, new = ids.shape[1], 4

    def decode(ids, mask):
        """Prefill in two chunks, then `new` greedy tokens; returns (prefill logits, step logits)."""
        cache = MeshCache(m.config, k)
        c = ids.shape[1] // 2
        am = None if mask is None else mask[:, :c]
        pre = [m(ids[:, :c], attention_mask=am, cache=cache, loops=k).logits]
        am = None if mask is None else mask
        pre.append(m(ids[:, c:], attention_mask=am, cache=cache, loops=k).logits)
        logits, out = pre[-1][:, -1], []
        for _ in range(new):
            nxt = logits.argmax(-1, keepdim=True)
            if mask is not None:
                mask = torch.cat((mask, torch.ones_like(nxt)), 1)
            logits = m(nxt, attention_mask=mask, cache=cache, loops=k).logits[:, -1]
            out.append(logits)
        return torch.cat(pre, 1), torch.stack(out, 1)

    with torch.no_grad():
        batch_pre, batch_steps = decode(ids, mask)
        for b, r in enumerate(rows):
            alone_pre, alone_steps = decode(r[None], None)
            valid = batch_pre[b, T - len(r) :]
            assert (valid - alone_pre[0]).abs().max() <= 1e-4
            assert (batch_steps[b] - alone_steps[0]).abs().max() <= 1e-4
            assert torch.equal(batch_steps[b].argmax(-1), alone_steps[0].argmax(-1))


# ---------------------------------------------------------------------------------------------
# Per-row depths in one batch
# ---------------------------------------------------------------------------------------------
class PrefixRowCache:
    """The cache protocol the server's pool implements, in its simplest form: one growing K/V per
    (stage, layer, iteration), holding the rows that reach it (a prefix of the depth-sorted batch)."""

    def __init__(self):
        self.kv = {}

    def update(self, k, v, layer_idx, kw):
        key = (kw["stage"], kw["index"], kw["iteration"])
        assert k.shape[0] == kw["rows"]
        old_k, old_v = self.kv.get(key, (k[:, :, :0], v[:, :, :0]))
        assert old_k.shape[0] == kw["rows"] and old_k.shape[2] == kw["cache_position"]
        self.kv[key] = (torch.cat((old_k, k), 2), torch.cat((old_v, v), 2))
        return self.kv[key]

    def get_seq_length(self):
        return self.kv[("prelude", 0, 0)][0].shape[2] if self.kv else 0


@pytest.mark.parametrize("scheme", RECURSIVE)
def test_mixed_depth_batch_equals_each_row_alone(scheme):
    m = build("1+1R2+1", scheme)
    depths = [3, 2, 2, 1]  # deepest first
    rows = [rand_ids(n, seed=10 + n) for n in (6, 4, 6, 5)]
    ids, mask = left_pad(rows)
    T = ids.shape[1]
    with torch.no_grad():
        # Full forward, no cache.
        mixed = m(ids, attention_mask=mask, loops=depths, use_cache=False)
        # Incremental: prefill then 3 greedy steps through the per-row protocol cache.
        cache = PrefixRowCache()
        logits = m(ids, attention_mask=mask, cache=cache, loops=torch.tensor(depths)).logits[:, -1]
        steps, am = [], mask
        for _ in range(3):
            nxt = logits.argmax(-1, keepdim=True)
            am = torch.cat((am, torch.ones_like(nxt)), 1)
            logits = m(nxt, attention_mask=am, cache=cache, loops=depths).logits[:, -1]
            steps.append(logits)
        steps = torch.stack(steps, 1)  # (B, 3, V)
        for b, (r, k) in enumerate(zip(rows, depths)):
            alone = m(r[None], loops=k, use_cache=False).logits[0]
            assert (mixed.logits[b, T - len(r) :] - alone).abs().max() <= 1e-4
            cache_b, seq = MeshCache(m.config, k), r[None]
            lg = m(seq, cache=cache_b, loops=k).logits[:, -1]
            for s in range(3):
                lg = m(lg.argmax(-1, keepdim=True), cache=cache_b, loops=k).logits[:, -1]
                assert (steps[b, s] - lg[0]).abs().max() <= 1e-4


def test_per_row_loops_are_validated():
    m = build()
    ids = rand_ids(3, 4)
    with pytest.raises(ValueError, match="deepest first"):
        m(ids, loops=[1, 2, 2], use_cache=False)
    with pytest.raises(ValueError, match="entries for a batch of 3"):
        m(ids, loops=[2, 1], use_cache=False)
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        m(ids, loops=[4, 2, 1], use_cache=False)
    with pytest.raises(ValueError, match="one depth"):
        m(ids, loops=[2, 2, 1], cache=MeshCache(m.config, 2))


# ---------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------
def test_generate_greedy_matches_argmax_loop_and_depth_matters():
    m = build("1+1R2+1", "mesh")
    ids = rand_ids(1, 5)
    outs = {}
    with torch.no_grad():
        for k in (1, 3):
            out = m.generate(ids, loops=k, max_new_tokens=8, do_sample=False, pad_token_id=0)
            seq = ids
            for _ in range(8):
                nxt = m(seq, loops=k, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat((seq, nxt), 1)
            assert torch.equal(out, seq)
            outs[k] = out
    assert not torch.equal(outs[1], outs[3])


def test_generate_left_padded_batch_equals_rows_alone():
    m = build("1+1R2+1", "anchor")
    rows = [rand_ids(6, seed=5), rand_ids(3, seed=6)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, loops=2, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for b, r in enumerate(rows):
            alone = m.generate(r[None], loops=2, max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(out[b, -5:], alone[0, -5:])


def test_generate_refuses_too_deep():
    m = build()
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        m.generate(rand_ids(1, 3), loops=4, max_new_tokens=2, pad_token_id=0)


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,scheme", [("3", "vanilla"), ("1+2R3+1", "mesh"), ("2+1R1+0", "anchor_emb")])
def test_save_load_round_trip(tmp_path, layout, scheme):
    m = build(layout, scheme, **({} if scheme == "vanilla" else {"max_loops": 4}))
    m.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, MeshConfig) and cfg.layout == layout and cfg.scheme == scheme
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MeshForCausalLM)
    for field in ("max_loops", "default_loops", "mesh_slots", "n_prelude", "n_core", "n_coda", "rotary_pct"):
        assert getattr(loaded.config, field) == getattr(m.config, field)
    ids = rand_ids(2, 7)
    with torch.no_grad():
        for k in range(1, m.config.max_loops + 1):
            assert torch.equal(m(ids, loops=k).logits, loaded(ids, loops=k).logits)


def test_layout_strings_round_trip():
    assert MeshConfig.from_layout("1+2R3+1", scheme="mesh", max_loops=4).layout == "1+2R3+1"
    cfg = MeshConfig.from_layout("2+4R2+2", scheme="residual")
    assert (cfg.max_loops, cfg.default_loops, cfg.mesh_slots) == (2, 2, 5)
    assert MeshConfig.from_layout(" 12 ").layout == "12"
    assert MeshConfig.from_layout("2+4R2+2").scheme == "mesh"


# ---------------------------------------------------------------------------------------------
# The recurrence equations (DESIGN.md section 1), recomputed by hand from the model's own layers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", RECURSIVE)
def test_stage_states_follow_the_scheme_equations(scheme):
    m = build("1+2R2+1", scheme, scale_embeddings=True)
    cfg = m.config
    if scheme == "mesh":
        with torch.no_grad():  # non-zero router biases, so a wrong pair index cannot hide
            for r in (*m.recurrence.write_routers, *m.recurrence.read_routers):
                r.bias.normal_(0.0, 1.0)
    ids = rand_ids(2, 7)
    pos = torch.arange(7)[None].expand(2, 7)
    cos, sin = rotary_cos_sin(cfg, pos, torch.float32)

    def layers(stack, h):
        for layer in stack:
            h = layer(h, cos, sin, None, None, 0, None)
        return h

    def route(pair, h):  # softmax(Linear(h)) over slots, for the write and the read router
        wr, rd = m.recurrence.write_routers[pair], m.recurrence.read_routers[pair]
        return torch.softmax(wr(h), -1), torch.softmax(rd(h), -1)

    with torch.no_grad():
        hs = m(ids, loops=MAX_LOOPS, output_hidden_states=True, use_cache=False).hidden_states
        assert len(hs) == MAX_LOOPS + 3
        h_emb = m.embed_in(ids) * cfg.hidden_size**0.5
        h_pre = layers(m.prelude, h_emb)
        if scheme == "mesh":
            mem = torch.zeros(2, 7, cfg.mesh_slots, cfg.hidden_size)
            mem[:, :, 0] = h_emb
            w, r = route(0, h_pre)  # the transitional pair
            mem = mem + torch.einsum("bts,btd->btsd", w, h_pre)
            h = torch.einsum("bts,btsd->btd", r, mem)
        else:
            h = h_pre
        h0, expected = h, [h_emb, h]
        for t in range(MAX_LOOPS):
            h_m = layers(m.core, h)
            if scheme == "mesh":
                w, r = route(t + 1, h)  # routers read h^(t); core step t uses pair t + 1
                mem = mem + torch.einsum("bts,btd->btsd", w, h_m)
                h = torch.einsum("bts,btsd->btd", r, mem)
            else:
                h = h_m + {"base": 0, "residual": h, "anchor": h0, "anchor_emb": h_emb}[scheme]
            expected.append(h)
        expected.append(layers(m.coda, h))
        for got, want in zip(hs, expected):
            assert (got - want).abs().max() <= 1e-5
        # Iteration t is computed the same way whatever K the call uses.
        shallow = m(ids, loops=1, output_hidden_states=True, use_cache=False).hidden_states
        for got, want in zip(shallow[:3], hs[:3]):
            assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# MeSH with one-hot routers == the residual scheme
# ---------------------------------------------------------------------------------------------
def test_one_hot_mesh_routers_compute_the_residual_scheme():
    """Routers forced onto slot 1 (which starts at zero), the transitional pair included: the
    transitional cycle gives h0 = h_pre and every step m_1 += core(h), h = m_1, i.e. h + core(h)."""
    mesh = build("1+2R2+1", "mesh")
    residual = build("1+2R2+1", "residual", seed=123)
    with torch.no_grad():
        for router in (*mesh.recurrence.write_routers, *mesh.recurrence.read_routers):
            router.weight.zero_()
            router.bias.zero_()
            router.bias[1] = 40.0  # softmax still runs: the other slots get ~e^-40
    missing, unexpected = residual.load_state_dict(mesh.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("recurrence.") for k in unexpected) and unexpected
    ids = rand_ids(2, 9)
    with torch.no_grad():
        for k in range(1, MAX_LOOPS + 1):
            a, b = mesh(ids, loops=k).logits, residual(ids, loops=k).logits
            assert (a - b).abs().max() <= 1e-5
    # Sanity: with the default (random) routers MeSH is a different function.
    with torch.no_grad():
        assert (build("1+2R2+1", "mesh")(ids).logits - residual(ids).logits).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layout="2+4R2+2", scheme="mixture"), "scheme must be one of"),
        (dict(layout="2+R2+2"), "cannot parse layout"),
        (dict(layout="2+4R0+2"), "K must be >= 1"),
        (dict(layout="2+0R2+2", scheme="mesh"), "at least one core layer"),
        (dict(layout="12", scheme="mesh"), "is vanilla"),
        (dict(layout="0"), "at least one layer"),
        (dict(layout="2+4R3+2", max_loops=2), r"default_loops must be in \[1, max_loops=2\]"),
        (dict(layout="2+4R2+2", mesh_slots=1), "mesh_slots must be an integer >= 2"),
        (dict(layout="2", hidden_size=30, num_attention_heads=4), "not divisible"),
        (dict(layout="2", rotary_pct=1.5), r"rotary_pct must be in \[0, 1\]"),
    ],
)
def test_invalid_configs_raise(kwargs, match):
    layout = kwargs.pop("layout")
    with pytest.raises(ValueError, match=match):
        MeshConfig.from_layout(layout, **kwargs)


@pytest.mark.parametrize("bad", [0, 4, -1, 2.0, "2", True])
def test_invalid_loops_name_the_range(bad):
    m = build()
    with pytest.raises(ValueError, match=r"loops must be an integer in \[1, 3\]"):
        m(rand_ids(1, 3), loops=bad)
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        MeshCache(m.config, bad)


def test_vanilla_accepts_only_one_loop():
    m = build("2", "vanilla")
    with torch.no_grad():
        m(rand_ids(1, 3), loops=1)
    with pytest.raises(ValueError, match=r"\[1, 1\]"):
        m(rand_ids(1, 3), loops=2)


def test_cache_and_mask_mismatches_raise():
    m = build()
    ids = rand_ids(2, 4)
    with pytest.raises(ValueError, match="built for loops=2"):
        m(ids, loops=3, cache=MeshCache(m.config, 2))
    cache = MeshCache(m.config, 2)
    m(ids, loops=2, cache=cache)
    with pytest.raises(ValueError, match=r"expected shape \(2, 5\)"):
        m(ids[:, :1], loops=2, cache=cache, attention_mask=torch.ones(2, 1))  # covers only the new token
    full = MeshCache(m.config, 2, max_cache_len=4)
    m(ids, loops=2, cache=full)
    with pytest.raises(ValueError, match="KV cache is full"):
        m(ids[:, :1], loops=2, cache=full)


# ---------------------------------------------------------------------------------------------
# Parameters, init and KV bytes
# ---------------------------------------------------------------------------------------------
def test_recursive_layout_has_one_third_fewer_non_embedding_parameters():
    dims = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, vocab_size=500)
    vanilla = MeshForCausalLM(MeshConfig.from_layout("12", **dims))
    mesh = MeshForCausalLM(MeshConfig.from_layout("2+4R2+2", scheme="mesh", **dims))
    residual = MeshForCausalLM(MeshConfig.from_layout("2+4R2+2", scheme="residual", **dims))
    final_norm = 2 * 64
    routers = sum(p.numel() for p in mesh.recurrence.parameters())
    assert routers == 2 * (2 + 1) * (64 * 5 + 5)  # (max_loops + 1) pairs of Linear(d -> max_loops + 3)
    v = vanilla.num_parameters(exclude_embeddings=True) - final_norm
    assert 3 * (mesh.num_parameters(exclude_embeddings=True) - final_norm - routers) == 2 * v
    assert 3 * (residual.num_parameters(exclude_embeddings=True) - final_norm) == 2 * v
    # Pythia convention: both the input and the (untied) output embedding are excluded.
    emb = 2 * 500 * 64
    assert vanilla.num_parameters() - vanilla.num_parameters(exclude_embeddings=True) == emb


def test_output_projections_use_depth_scaled_init():
    torch.manual_seed(0)
    cfg = MeshConfig.from_layout("2+4R2+2", scheme="mesh", hidden_size=128, num_attention_heads=4, vocab_size=100)
    m = MeshForCausalLM(cfg)
    expected = 0.02 / (2 * cfg.num_layer_applications()) ** 0.5  # N_compute = 2 + 2*4 + 2 = 12
    for layer in (*m.prelude, *m.core, *m.coda):
        for w in (layer.attention.dense.weight, layer.mlp.dense_4h_to_h.weight):
            assert abs(w.std().item() / expected - 1) < 0.05
        assert abs(layer.mlp.dense_h_to_4h.weight.std().item() / 0.02 - 1) < 0.05


@pytest.mark.parametrize("k", [1, 2, 3])
def test_kv_bytes_per_token_matches_the_allocation(k):
    m = build("1+2R2+1", "mesh")
    d, n_apps = m.config.hidden_size, 1 + 2 * k + 1
    assert m.config.num_layer_applications(k) == n_apps
    assert m.kv_bytes_per_token(k) == 2 * n_apps * d * 4
    assert m.kv_bytes_per_token(k, dtype=torch.bfloat16) == 2 * n_apps * d * 2
    B, L = 3, 10
    cache = MeshCache(m.config, k, max_cache_len=L)
    assert cache.kv_bytes_per_token() == m.kv_bytes_per_token(k)
    with torch.no_grad():
        m(rand_ids(B, 4), cache=cache, loops=k)
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert len(cache.layers) == n_apps
    assert allocated == m.kv_bytes_per_token(k) * B * L


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def test_hidden_states_loss_and_logits_to_keep():
    m = build("1+1R2+1", "mesh")
    ids = rand_ids(2, 6)
    with torch.no_grad():
        out = m(ids, loops=3, labels=ids, output_hidden_states=True, use_cache=False)
        assert len(out.hidden_states) == 3 + 3  # h_emb, h^(0..3), h_out
        assert torch.equal(out.hidden_states[0], m.embed_in(ids))
        expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        assert torch.allclose(out.loss, expected)
        last = m(ids, loops=3, logits_to_keep=1, use_cache=False).logits
        assert last.shape == (2, 1, VOCAB) and torch.allclose(last[:, 0], out.logits[:, -1], atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@torch.inference_mode()
def test_stages_compose_to_forward(case):
    """start -> iterate(0, d) -> iterate(d, K) -> finish -> compute_logits equals forward for every split
    point d: the state after iteration d is all a later resume needs (depth-continuation drafting)."""
    layout, scheme, K, extra = case
    m = build(layout, scheme, **extra)
    ids = rand_ids(2, 9)
    ref = m(ids, loops=K, use_cache=False).logits
    pos = torch.arange(9)[None].expand(2, 9)
    for d in range(K + 1):
        ctx = m.layer_context(pos, loops=K)
        state = m.iterate(m.start(m.embed(ids), ctx), 0, d, ctx)
        state = m.iterate(state, d, K, ctx)
        logits = m.compute_logits(m.finish(state, ctx))
        assert torch.equal(logits, ref), (case, d)


@torch.inference_mode()
def test_per_depth_coda_reads_in_a_mixed_depth_batch():
    """With coda_read_routers each row of a mixed-depth batch reads the coda's input with its own depth's
    router: the batch equals every row run alone."""
    m = build("1+1R2+1", "mesh", coda_read_routers=True)
    ids = rand_ids(3, 6)
    mixed = m(ids, loops=[3, 2, 1], use_cache=False).logits
    for i, k in enumerate([3, 2, 1]):
        torch.testing.assert_close(m(ids[i : i + 1], loops=k, use_cache=False).logits, mixed[i : i + 1], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_fused_routers_match_and_keep_the_checkpoint_keys():
    m = build("1+1R2+1", "mesh")
    ids = rand_ids(2, 7)
    keys = set(m.state_dict())
    ref = m(ids, loops=3, use_cache=False).logits
    m.recurrence.fuse_routers()
    torch.testing.assert_close(m(ids, loops=3, use_cache=False).logits, ref, atol=1e-5, rtol=0)
    assert set(m.state_dict()) == keys and m.recurrence.fused is not None
    with torch.no_grad():  # in training mode the routers' own weights are used: a change shows at once
        m.recurrence.write_routers[1].bias[0] += 5.0  # (a uniform shift would leave the softmax alone)
    m.train()
    trained = m(ids, loops=3, use_cache=False).logits
    m.eval()
    assert not torch.allclose(trained, ref, atol=1e-3)
