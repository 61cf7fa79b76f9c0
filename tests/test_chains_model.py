"""Recipe switches for depth (coda read routers, losses at every depth), chains training and its
evaluation in process and through a real server."""

from __future__ import annotations

import json

import pytest
import torch

from model import MeshConfig, MeshForCausalLM
from training import evaluate_chains, train
from training.depth import unused_parameters
from training.tasks import chains
from training.train import depth_logits

SMALL = dict(vocab_size=128, hidden_size=32, num_attention_heads=2, max_loops=4, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=1)


def small_model(seed=0, **kw) -> MeshForCausalLM:
    torch.manual_seed(seed)
    return MeshForCausalLM(MeshConfig.from_layout("1+1R2+1", scheme="mesh", **{**SMALL, **kw})).eval()


def ids(seed=0) -> torch.Tensor:
    return torch.tensor([chains.encode(chains.make_problem(chains.rng_for("test", seed, i), 3).prompt())[:20] for i in range(2)])


def test_coda_read_routers_are_one_per_depth_and_need_mesh():
    m = small_model(coda_read_routers=True)
    assert len(m.recurrence.coda_routers) == 4
    assert m.recurrence.coda_routers[0].weight.shape == (m.config.mesh_slots, 32)
    assert not hasattr(small_model().recurrence, "coda_routers")
    with pytest.raises(ValueError, match="coda_read_routers needs the mesh scheme"):
        MeshConfig.from_layout("1+1R2+1", scheme="residual", coda_read_routers=True)


@pytest.mark.parametrize("k", [1, 3])
def test_coda_router_k_feeds_the_coda_at_depth_k_only(k):
    m = small_model(coda_read_routers=True)
    x = ids()
    with torch.no_grad():
        before = {d: m(input_ids=x, loops=d, use_cache=False).logits for d in range(1, 5)}
        m.recurrence.coda_routers[k - 1].bias.add_(torch.linspace(-2, 2, m.config.mesh_slots))
        after = {d: m(input_ids=x, loops=d, use_cache=False).logits for d in range(1, 5)}
    for d in range(1, 5):
        assert torch.equal(before[d], after[d]) == (d != k), d


def test_a_checkpoint_without_the_field_loads_unchanged(tmp_path):
    m = small_model()
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("coda_read_routers", None)  # as written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = MeshForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.coda_read_routers is False
    assert set(loaded.state_dict()) == set(m.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids(), loops=3).logits, m(input_ids=ids(), loops=3).logits)


def test_coda_routers_save_and_load(tmp_path):
    m = small_model(coda_read_routers=True)
    m.save_pretrained(tmp_path)
    loaded = MeshForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.coda_read_routers is True
    with torch.no_grad():
        for d in (1, 4):
            assert torch.equal(loaded(input_ids=ids(), loops=d).logits, m(input_ids=ids(), loops=d).logits)


@pytest.mark.parametrize("coda", [False, True])
def test_depth_logits_equal_a_forward_at_each_depth(coda):
    m = small_model(coda_read_routers=coda)
    with torch.no_grad():
        got = depth_logits(m, ids(), [1, 2, 4])
        for d, logits in got.items():
            torch.testing.assert_close(logits, m(input_ids=ids(), loops=d, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_unused_parameters_include_the_coda_routers_a_step_does_not_read():
    m = small_model(coda_read_routers=True)
    routers = m.recurrence.coda_routers
    ids_of = lambda ps: {id(p) for p in ps}  # noqa: E731
    last = ids_of(unused_parameters(m, 2))
    every = ids_of(unused_parameters(m, 2, all_depths=True))
    assert ids_of(routers[1].parameters()).isdisjoint(last) and ids_of(routers[0].parameters()) <= last
    assert ids_of(routers[0].parameters()).isdisjoint(every) and ids_of(routers[2].parameters()) <= every


CHAINS_SETS = [
    "data.task=chains", "data.max_hops=3", "data.queries=4", "data.loops_per_hop=1.0", "data.advance_at=0.3", "data.ema=0.5",
    "model.layout=1+1R2+1", "model.max_loops=3", "model.hidden_size=32", "model.num_attention_heads=2",
    "model.intermediate_size=64", "model.coda_read_routers=true", "model.max_position_embeddings=256",
    "train.seq_len=256", "train.batch_size=8", "train.max_steps=8", "train.lr=3e-3", "train.warmup_steps=2",
    "train.depth_sampling=fixed", "train.fixed_loops=3", "train.depth_losses=all", "train.eval_interval=4",
    "train.eval_windows=4", "train.log_interval=1", "train.checkpoint_interval=4", "train.threads=1",
]


def chains_args(out):
    args = ["--config", "training/configs/tiny.toml", "--out", str(out), "--quiet"]
    for s in CHAINS_SETS:
        args += ["--set", s]
    return args


def records(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "accuracy" in r]


def test_chains_training_resumes_exactly(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.main(chains_args(full)) == 0
    assert train.main(chains_args(cut) + ["--stop-after-steps", "4"]) == 0
    assert train.main(chains_args(cut)) == 0
    want, want_acc = records(full)
    got, got_acc = records(cut)
    assert [(r["loss"], r["loops"], r["curriculum"]) for r in got] == [(r["loss"], r["loops"], r["curriculum"]) for r in want]
    assert got_acc == want_acc and set(want_acc[-1]["accuracy"]) == {"1", "2", "3"}
    # The curriculum's depth cap: level 1 steps run 1 loop (loops_per_hop = 1), whatever fixed_loops says.
    assert want[0]["loops"] == 1 and want[0]["curriculum"]["hops"] == 1
    state = torch.load(full / "latest" / "trainer_state.pt", weights_only=True)
    assert state["data"]["sampler"] == "chains" and state["data"]["level"] == want[-1]["curriculum"]["hops"]
    assert (full / "latest" / "tokenizer.json").is_file()


def test_chains_settings_are_checked(tmp_path, capsys):
    assert train.main(chains_args(tmp_path / "r") + ["--set", "data.bogus=1"]) == 2
    assert "unknown data setting data.bogus for task chains" in capsys.readouterr().err
    assert train.main(chains_args(tmp_path / "r") + ["--set", "train.depth_losses=some"]) == 2
    assert "train.depth_losses must be 'last' or 'all'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def random_chains_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("chains-model")
    m = small_model(seed=3, coda_read_routers=True)
    m.save_pretrained(path)
    chains.char_tokenizer().save_pretrained(str(path))
    return path, m


def test_http_answers_equal_in_process_answers(random_chains_model, serve, capsys):
    path, m = random_chains_model
    server = serve(["--model", str(path)])
    prompts = [p.prompt() for h in (1, 3) for p in chains.eval_problems("test", 0, h, 12)]
    local = evaluate_chains.model_answers(m, prompts, [1, 4])
    remote = evaluate_chains.http_answers(server.url, prompts, [1, 4])
    assert remote == local
    assert local[1] != local[4]  # the depths really differ, so the comparison covers the loops field
    assert evaluate_chains.main(["--url", server.url, "--loops", "1,4", "--hops", "1-2", "--n", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = evaluate_chains.accuracy_table(lambda ps, ks: evaluate_chains.model_answers(m, ps, ks), [1, 2], [1, 4], 6)
    assert out["accuracy"] == {str(h): {str(k): a for k, a in row.items()} for h, row in want.items()}


def test_evaluate_chains_in_process_cli_and_errors(random_chains_model, capsys):
    path, _ = random_chains_model
    assert evaluate_chains.main(["--model", str(path), "--loops", "1-2", "--hops", "2", "--n", "4"]) == 0
    assert "| 2 |" in capsys.readouterr().out
    assert evaluate_chains.main(["--model", str(path), "--loops", "1-9", "--hops", "2"]) == 2
    assert "--loops 5 is outside [1, 4]" in capsys.readouterr().err
    assert evaluate_chains.main(["--url", "http://127.0.0.1:9", "--hops", "1", "--n", "1"]) == 2
    assert "cannot" in capsys.readouterr().err


def test_max_offset_keeps_every_row_and_stage_to_copy_chains(tmp_path):
    """data.max_offset = 0: every row (the level's and the shorter ones) is a copy chain, and a learned
    level moves on to the next hop count instead of to larger offsets."""
    from types import SimpleNamespace

    from training.common import UsageError
    from training.sources import ChainsSource

    tc = SimpleNamespace(seed=0, batch_size=16)
    src = ChainsSource({"task": "chains", "max_offset": 0, "offset_stages": [0], "start_hops": 2, "ema": 0.0}, tc, tmp_path)
    x, _, _ = src.batch(0, 0, 16)
    text = "".join(row_texts(x))
    ops = [text[i + 1] for i, c in enumerate(text[:-1]) if c in "+-"]
    assert ops and set(ops) == {"0"}
    src.observe(torch.tensor([16.0, 16.0]))  # level 2 learned
    assert (src.level, src.max_offset) == (3, 0)
    with pytest.raises(UsageError, match="data.max_offset must be a digit"):
        ChainsSource({"task": "chains", "max_offset": 10}, tc, tmp_path)


def row_texts(x) -> list[str]:
    return ["".join(chains.TOKENS[t - len(chains.SPECIAL)] for t in row if t >= len(chains.SPECIAL)) for row in x.tolist()]


def test_zero_literal_and_copy_rows_mix_into_the_batch(tmp_path):
    """data.zero_literal_rows / data.copy_rows: each row is a problem of one kind, and the curriculum
    counts only the task's own rows; with both at 0 the batches are those of a run without them."""
    from types import SimpleNamespace

    from training.common import UsageError
    from training.sources import ChainsSource

    tc = SimpleNamespace(seed=0, batch_size=32)
    src = ChainsSource({"task": "chains", "start_hops": 3, "zero_literal_rows": 0.25, "copy_rows": 0.25}, tc, tmp_path)
    x, _, hops = src.batch(0, 0, 32)
    kinds = []
    for text, marked in zip(row_texts(x), (hops > 0).any(1).tolist()):
        asg = text.split(";?")[0].split(";")
        zero = all(a[2] == "0" for a in asg if len(a) == 3)
        copy = all(a[4] == "0" for a in asg if len(a) == 5)
        kinds.append("zero" if zero and not marked else "copy" if copy and not marked else "task" if marked else "?")
    assert sorted(set(kinds)) == ["copy", "task", "zero"]
    plain = ChainsSource({"task": "chains", "start_hops": 3}, tc, tmp_path).batch(0, 0, 32)[0]
    same = ChainsSource({"task": "chains", "start_hops": 3, "zero_literal_rows": 0, "copy_rows": 0.0}, tc, tmp_path).batch(0, 0, 32)[0]
    assert torch.equal(plain, same)
    with pytest.raises(UsageError, match="sum of at most 1"):
        ChainsSource({"task": "chains", "zero_literal_rows": 0.6, "copy_rows": 0.5}, tc, tmp_path)


@pytest.mark.parametrize("mix_hops", ["level", "all"])
def test_mix_hops_draws_the_mixed_rows_hop_counts(tmp_path, mix_hops):
    """At curriculum level 1 every task row has 1 hop; mixed rows too with "level", longer ones with "all"."""
    from types import SimpleNamespace

    from tests.test_chains import solve
    from training.sources import ChainsSource

    data = {"task": "chains", "copy_rows": 0.5, "mix_hops": mix_hops}
    x, _, _ = ChainsSource(data, SimpleNamespace(seed=0, batch_size=32), tmp_path).batch(0, 0, 32)
    first = []
    for text in row_texts(x):
        head, _, queries = text.partition(";?")
        first.append(solve(head)[1][queries[0]])
    assert (max(first) > 1) == (mix_hops == "all")


def test_init_from_starts_a_fresh_run_from_a_model(tmp_path, random_chains_model, capsys):
    short = ["--set", "train.max_steps=1", "--set", "train.eval_interval=0"]
    assert train.main(chains_args(tmp_path / "a") + short) == 0
    tuned = ["--set", f"train.init_from={tmp_path / 'a' / 'latest'}", "--set", "train.lr=1e-12"]
    assert train.main(chains_args(tmp_path / "b") + short + tuned) == 0
    a = MeshForCausalLM.from_pretrained(tmp_path / "a" / "latest").state_dict()
    b = MeshForCausalLM.from_pretrained(tmp_path / "b" / "latest").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    other = ["--set", f"train.init_from={random_chains_model[0]}"]
    assert train.main(chains_args(tmp_path / "c") + short + other) == 2
    assert "is a different architecture than [model]" in capsys.readouterr().err


def test_evaluate_chains_max_offset_scores_copy_chains(random_chains_model, capsys):
    path, _ = random_chains_model
    assert evaluate_chains.main(["--model", str(path), "--loops", "1", "--hops", "2", "--n", "3", "--max-offset", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_offset"] == 0 and set(out["accuracy"]) == {"2"}
    problems = chains.eval_problems("test", 0, 2, 3, max_offset=0)
    assert all(a[4] == "0" for p in problems for a in p.assignments if len(a) == 5)
