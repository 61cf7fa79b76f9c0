"""Training pipeline on CPU: prepare -> train (tiny) -> resume -> evaluate -> export.

Everything runs on text the tests generate, with training/configs/tiny.toml (seconds per run).
The DDP test (2 processes, gloo) is in test_training_ddp.py.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from training import default_model, evaluate, prepare, train
from training.checkpoint import latest_checkpoint
from training.config import load_config
from training.data import TokenData, batch_offsets, load_tokenizer
from training.depth import sample_depth, unused_parameters

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.toml"
VOCAB = 320


def make_text(n_lines: int = 1500, seed: int = 0) -> str:
    """A small play-like corpus with learnable structure (speaker lines, a tiny grammar)."""
    rng = random.Random(seed)
    names = ["ROMEO", "JULIET", "NURSE", "MERCUTIO", "TYBALT"]
    verbs = ["love", "hate", "see", "fear", "know", "call"]
    nouns = ["night", "sword", "rose", "moon", "house", "name"]
    adjs = ["fair", "dark", "sweet", "cruel", "gentle"]
    lines = []
    for _ in range(n_lines // 3):
        lines.append(f"{rng.choice(names)}:")
        lines.append(f"I {rng.choice(verbs)} the {rng.choice(adjs)} {rng.choice(nouns)}, and thou {rng.choice(verbs)}est my {rng.choice(nouns)}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r], [r for r in recs if "eval" in r]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "play.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    assert prepare.main(["--input", str(corpus), "--out", str(out), "--vocab-size", str(VOCAB), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory) -> Path:
    """One uninterrupted tiny run (40 steps, evals and checkpoints at 20 and 40)."""
    run = tmp_path_factory.mktemp("run-full")
    assert train.main(["--config", str(TINY), "--data", str(data_dir), "--out", str(run), "--quiet"]) == 0
    return run


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------
def test_prepare_split_counts_and_round_trip(corpus, data_dir):
    text = corpus.read_text(encoding="utf-8")
    data = TokenData(data_dir)
    meta = data.meta
    n_val = int(round(len(text) * 0.1))
    assert meta["val"]["chars"] == n_val and meta["train"]["chars"] == len(text) - n_val
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == len(text.encode("utf-8"))
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= VOCAB
    tok = load_tokenizer(data_dir)
    assert tok.eos_token == "<|endoftext|>" and meta["eos_token_id"] == tok.eos_token_id == 0
    assert meta["pad_token_id"] == tok.pad_token_id == 1
    # The memmaps decode back to exactly the two halves of the text: the val split is the tail.
    for name, part in (("train", text[: len(text) - n_val]), ("val", text[len(text) - n_val :])):
        ids = data.split(name)
        assert len(ids) == meta[name]["tokens"]
        assert tok.decode(np.asarray(ids).tolist()) == part


def test_prepare_reuses_a_tokenizer(corpus, data_dir, tmp_path):
    out = tmp_path / "reused"
    assert prepare.main(["--input", str(corpus), "--out", str(out), "--tokenizer", str(data_dir), "--quiet"]) == 0
    a, b = TokenData(data_dir), TokenData(out)
    assert np.array_equal(a.split("train"), b.split("train")) and np.array_equal(a.split("val"), b.split("val"))
    assert b.meta["tokenizer_source"] == str(data_dir)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.txt", "input file not found"),
        (lambda d: (d / "empty.txt").write_text("") and None or d / "empty.txt", "input file is empty"),
        (lambda d: d, "input file is not a file"),
    ],
)
def test_prepare_clear_errors(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert prepare.main(["--input", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepare: error: {message}") and "Traceback" not in err


def test_prepare_rejects_bad_vocab_and_fraction(corpus, tmp_path, capsys):
    assert prepare.main(["--input", str(corpus), "--out", str(tmp_path / "a"), "--vocab-size", "100", "--quiet"]) == 2
    assert "--vocab-size must be at least" in capsys.readouterr().err
    assert prepare.main(["--input", str(corpus), "--out", str(tmp_path / "b"), "--val-fraction", "1.5", "--quiet"]) == 2
    assert "--val-fraction must be in (0, 1)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# depth sampling and batches: pure functions of (seed, step)
# ---------------------------------------------------------------------------------------------
def test_depth_sampling_is_deterministic_and_in_range():
    for mode in ("uniform", "heavy"):
        ks = [sample_depth(s, 7, mode, 4, mean=2.5) for s in range(2000)]
        assert ks == [sample_depth(s, 7, mode, 4, mean=2.5) for s in range(2000)]
        assert set(ks) == {1, 2, 3, 4}
    uniform = np.bincount([sample_depth(s, 7, "uniform", 4) for s in range(4000)])[1:]
    assert uniform.min() > 900  # ~1000 each
    heavy = np.bincount([sample_depth(s, 7, "heavy", 16, mean=3) for s in range(4000)], minlength=17)[1:]
    assert heavy[:3].sum() > heavy[3:].sum() and heavy[8:].sum() > 0  # mostly shallow, with a tail
    assert all(sample_depth(s, 7, "fixed", 4, fixed=3) == 3 for s in range(10))
    weighted = np.bincount([sample_depth(s, 7, "weighted", 4, weights=[1, 0, 1, 2]) for s in range(4000)], minlength=5)[1:]
    assert weighted[1] == 0 and 1800 < weighted[3] < 2200 and 800 < weighted[0] < 1200
    assert sample_depth(0, 1, "uniform", 4) != sample_depth(0, 2, "uniform", 4) or sample_depth(1, 1, "uniform", 4) != sample_depth(1, 2, "uniform", 4)


def test_batches_depend_only_on_seed_and_step():
    a = batch_offsets(10_000, 32, 8, seed=1, step=5)
    assert np.array_equal(a, batch_offsets(10_000, 32, 8, seed=1, step=5))
    assert not np.array_equal(a, batch_offsets(10_000, 32, 8, seed=1, step=6))
    assert a.min() >= 0 and a.max() <= 10_000 - 33


def test_unused_router_pairs():
    from model import MeshConfig, MeshForCausalLM

    cfg = MeshConfig.from_layout("1+1R2+1", scheme="mesh", max_loops=3, hidden_size=32, num_attention_heads=2, vocab_size=64)
    m = MeshForCausalLM(cfg)
    assert len(unused_parameters(m, 3)) == 0
    unused = {id(p) for p in unused_parameters(m, 1)}  # pairs 2 and 3 (step t uses pair t + 1)
    x = torch.randint(0, 64, (2, 8))
    m(input_ids=x, loops=1, use_cache=False).logits.sum().backward()
    for p in m.parameters():
        assert (p.grad is None) == (id(p) in unused)


# ---------------------------------------------------------------------------------------------
# train / resume
# ---------------------------------------------------------------------------------------------
def test_training_lowers_the_loss(full_run):
    steps, evals = read_metrics(full_run)
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert {r["loops"] for r in steps} == {1, 2, 3}  # depth-elastic: every depth was trained
    first, last = np.mean([r["loss"] for r in steps[:3]]), np.mean([r["loss"] for r in steps[-3:]])
    assert last < first - 2.0, (first, last)
    assert [e["step"] for e in evals] == [20, 40]
    for k in ("1", "2", "3"):
        assert evals[1]["eval"][k] < evals[0]["eval"][k] < math.log(VOCAB)


def test_checkpoint_is_a_hugging_face_model(full_run):
    import model  # noqa: F401  (registers model_type "mesh")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = latest_checkpoint(full_run)
    assert ckpt.name == "step-0000040" and (full_run / "latest").resolve() == ckpt
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["step-0000020", "step-0000040"]
    m = AutoModelForCausalLM.from_pretrained(str(full_run / "latest"))
    tok = AutoTokenizer.from_pretrained(str(full_run / "latest"))
    assert m.config.eos_token_id == tok.eos_token_id == 0 and m.config.max_loops == 3
    ids = tok("ROMEO:\nI", return_tensors="pt")["input_ids"]
    out = m.generate(ids, loops=3, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 40 and state["data"]["next_step"] == 40 and len(state["rng"]) == 1
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 40


def test_resume_gives_the_same_losses(data_dir, full_run, tmp_path, capsys):
    run = tmp_path / "interrupted"
    args = ["--config", str(TINY), "--data", str(data_dir), "--out", str(run), "--quiet", "--stop-after-steps", "15"]
    assert train.main(args) == 0
    assert latest_checkpoint(run).name == "step-0000015"
    # A crash mid-write leaves a temp dir and maybe a stray file: neither is ever read.
    (run / "checkpoints" / ".tmp-step-0000016-999").mkdir()
    (run / "checkpoints" / "step-0000099").mkdir()  # no trainer_state.pt: not a checkpoint
    with open(run / "metrics.jsonl", "a") as f:  # records past the checkpoint, as after a crash
        f.write(json.dumps({"step": 16, "loss": 123.0}) + "\n" + '{"step": 17, "lo')  # and a line cut short by a kill
    assert train.main(args) == 0  # the same command continues: steps 16..30
    assert "resuming from" in capsys.readouterr().out
    assert train.main(args) == 0  # 31..40
    got_steps, got_evals = read_metrics(run)
    want_steps, want_evals = read_metrics(full_run)
    assert [r["step"] for r in got_steps] == list(range(1, 41))
    # Same process, same CPU kernels: bit-identical losses, depths and evals.
    assert [(r["loss"], r["loops"]) for r in got_steps] == [(r["loss"], r["loops"]) for r in want_steps]
    assert [e["eval"] for e in got_evals] == [e["eval"] for e in want_evals]
    assert train.main(args) == 0  # nothing left to do
    assert "already trained to step 40" in capsys.readouterr().out


def test_resume_refuses_a_different_model(data_dir, full_run, capsys):
    args = ["--config", str(TINY), "--data", str(data_dir), "--out", str(full_run), "--quiet", "--set", "model.hidden_size=32"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "holds a run of a different model (model.hidden_size changed)" in err
    assert latest_checkpoint(full_run).name == "step-0000040"  # untouched


def test_gradient_accumulation_matches_one_big_batch(data_dir, full_run, tmp_path):
    run = tmp_path / "accum"
    args = ["--config", str(TINY), "--data", str(data_dir), "--out", str(run), "--quiet"]
    assert train.main(args + ["--set", "train.micro_batch_size=2", "--set", "train.max_steps=10", "--set", "train.eval_interval=0"]) == 0
    got = [r["loss"] for r in read_metrics(run)[0]]
    want_run = tmp_path / "big"
    assert train.main(["--config", str(TINY), "--data", str(data_dir), "--out", str(want_run), "--quiet", "--set", "train.max_steps=10", "--set", "train.eval_interval=0"]) == 0
    want = [r["loss"] for r in read_metrics(want_run)[0]]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_dropout_and_heavy_depths_train(data_dir, tmp_path):
    run = tmp_path / "heavy"
    sets = ["train.depth_sampling=heavy", "train.depth_mean=2.0", "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "train.max_steps=12", "train.eval_interval=0"]
    argv = ["--config", str(TINY), "--data", str(data_dir), "--out", str(run), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    assert train.main(argv) == 0
    steps, evals = read_metrics(run)
    assert steps[-1]["loss"] < steps[0]["loss"] and len(evals) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "train.lr=-1"], "train.lr must be > 0"),
        (["--set", "train.bogus=1"], "unknown train setting train.bogus"),
        (["--set", "model.layout=2+xR2"], "cannot parse layout"),
        (["--set", "model.nonsense=3"], "unknown model setting model.nonsense"),
        (["--set", "lr=1"], "--set expects table.key=value"),
        (["--set", "train.depth_sampling=sometimes"], "train.depth_sampling must be one of"),
        (["--set", "train.batch_size=7", "--set", "train.micro_batch_size=2"], "not divisible by train.micro_batch_size"),
        (["--set", "train.depth_sampling=fixed", "--set", "train.fixed_loops=9"], "loops must be an integer in [1, 3]"),
        (["--set", "train.depth_sampling=weighted", "--set", "train.depth_weights=[1, 2]"], "train.depth_weights needs 3 weights"),
        (["--set", "train.depth_sampling=weighted"], "train.depth_weights must be non-negative numbers"),
    ],
)
def test_train_clear_errors(data_dir, tmp_path, capsys, extra, message):
    assert train.main(["--config", str(TINY), "--data", str(data_dir), "--out", str(tmp_path / "r"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: error: ") and message in err and "Traceback" not in err


def test_train_missing_inputs(tmp_path, data_dir, capsys):
    assert train.main(["--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "r")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert train.main(["--config", str(TINY), "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "is not a prepared data directory" in capsys.readouterr().err
    assert train.main(["--config", str(TINY), "--out", str(tmp_path / "r")]) == 2
    assert "no data directory" in capsys.readouterr().err


def test_config_overrides_parse_toml_values():
    cfg = load_config(TINY, ["train.lr=1e-3", "train.eval_loops=[1, 3]", "model.layout=2+2R4+1", "train.compile=true"])
    assert cfg["train"].lr == 1e-3 and cfg["train"].eval_loops == [1, 3] and cfg["train"].compile is True
    assert cfg["model"]["layout"] == "2+2R4+1"


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------
def test_evaluate_data_and_text_agree(full_run, data_dir, corpus, capsys):
    assert evaluate.main(["--model", str(full_run), "--data", str(data_dir), "--json", "--quiet"]) == 0
    by_data = json.loads(capsys.readouterr().out)
    assert evaluate.main(["--model", str(full_run), "--text", str(corpus), "--val-fraction", "0.1", "--json", "--quiet"]) == 0
    by_text = json.loads(capsys.readouterr().out)
    assert by_data["counts"] == by_text["counts"] == TokenData(data_dir).meta["val"]
    assert [r["loops"] for r in by_data["results"]] == [1, 2, 3]
    counts = by_data["counts"]
    for a, b in zip(by_data["results"], by_text["results"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["nats_per_char"] == pytest.approx(a["loss"] * counts["tokens"] / counts["chars"])
        assert a["bits_per_byte"] == pytest.approx(a["loss"] * counts["tokens"] / counts["bytes"] / math.log(2))
        assert a["perplexity"] == pytest.approx(math.exp(a["loss"]))
        assert a["tokens"] == counts["tokens"] - 1  # every token but the first is predicted once
    # The trained model beats a uniform guess at every depth.
    assert all(r["loss"] < math.log(VOCAB) - 1 for r in by_data["results"])


def test_evaluate_table_and_errors(full_run, data_dir, tmp_path, capsys):
    assert evaluate.main(["--model", str(full_run), "--data", str(data_dir), "--loops", "1,3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| loops | loss (nats/token) | perplexity | nats/char | bits/byte |" in out
    assert out.count("\n| 1 |") == 1 and out.count("\n| 3 |") == 1
    assert evaluate.main(["--model", str(full_run), "--data", str(data_dir), "--loops", "1,4", "--quiet"]) == 2
    assert "--loops 4 is outside [1, 3]" in capsys.readouterr().err
    assert evaluate.main(["--model", str(tmp_path), "--data", str(data_dir), "--quiet"]) == 2
    assert "evaluate: error: no model in" in capsys.readouterr().err
    assert evaluate.main(["--model", str(full_run), "--text", str(tmp_path / "none.txt"), "--quiet"]) == 2
    assert "text file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the default-model pipeline (tiny settings): prepare -> train -> evaluate -> export
# ---------------------------------------------------------------------------------------------
def test_default_model_pipeline_exports_a_servable_model(corpus, tmp_path, capsys):
    out, work = tmp_path / "default", tmp_path / "work"
    argv = ["--text", str(corpus), "--out", str(out), "--work", str(work), "--config", str(TINY), "--quiet",
            "--set", f"data.vocab_size={VOCAB}", "--set", "train.max_steps=20", "--set", "train.eval_interval=0"]
    assert default_model.main(argv) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md", "eval.json"])
    config = json.loads((out / "config.json").read_text())
    results = json.loads((out / "eval.json").read_text())["results"]
    best = min(results, key=lambda r: r["loss"])["loops"]
    assert config["default_loops"] == best and config["max_loops"] == 3
    card = (out / "MODEL_CARD.md").read_text()
    assert "python -m training.default_model" in card and "| 3 |" in card and "tokens/s" in card
    capsys.readouterr()
    assert evaluate.main(["--model", str(out), "--text", str(corpus), "--json", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)["results"]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in results], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Claims the README makes about training
# ---------------------------------------------------------------------------------------------
def test_router_pairs_a_step_does_not_reach_keep_their_initial_weights(data_dir, tmp_path):
    """Fixed K=1 on a max_loops=3 model: pairs 0 and 1 train, pairs 2 and 3 never get an update."""
    from model import MeshForCausalLM
    from safetensors.torch import load_file

    from training.config import model_config
    from training.data import TokenData

    run = tmp_path / "k1"
    sets = ["train.depth_sampling=fixed", "train.fixed_loops=1", "train.max_steps=6", "train.eval_interval=0"]
    argv = ["--config", str(TINY), "--data", str(data_dir), "--out", str(run), "--quiet"]
    assert train.main(argv + [a for s in sets for a in ("--set", s)]) == 0
    cfg = load_config(TINY, sets, str(data_dir))
    torch.manual_seed(cfg["train"].seed)  # what train.py does before building the model
    init = MeshForCausalLM(model_config(cfg, TokenData(data_dir).meta)).state_dict()
    trained = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    for pair in range(4):
        for kind in ("write_routers", "read_routers"):
            name = f"recurrence.{kind}.{pair}.weight"
            assert torch.equal(init[name], trained[name]) == (pair >= 2), name
    assert not torch.equal(init["core.0.mlp.dense_h_to_4h.weight"], trained["core.0.mlp.dense_h_to_4h.weight"])


def test_schedule_and_adamw_settings_are_the_logged_ones(full_run):
    """Linear warmup over 4 steps to lr 3e-3 (tiny.toml), then cosine to 10% at step 40; AdamW
    (0.9, 0.95), eps 1e-8, weight decay 0.01 on matrices and none on biases and norms."""
    steps, _ = read_metrics(full_run)
    peak, warmup, total = 3e-3, 4, 40
    for r in steps:
        s = r["step"] - 1  # the lr a record logs is the one its step used
        want = peak * (s + 1) / warmup if s < warmup else peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
        assert math.isclose(r["lr"], want, rel_tol=1e-9), r
    assert math.isclose(steps[-1]["lr"], peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 35 / 36))), rel_tol=1e-9)
    state = torch.load(latest_checkpoint(full_run) / "trainer_state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.95) and g["eps"] == 1e-8 for g in groups)
    from safetensors.torch import load_file

    weights = load_file(str(latest_checkpoint(full_run) / "model.safetensors"))
    n_matrix = sum(1 for v in weights.values() if v.dim() >= 2)
    assert len(groups[0]["params"]) == n_matrix and len(groups[1]["params"]) == len(weights) - n_matrix


def test_token_files_past_65536_are_uint32_and_train(corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = corpus.read_text(encoding="utf-8")
    words = sorted({piece for piece, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    vocab = {"<|endoftext|>": 0, "<|padding|>": 1, "[UNK]": 2}
    vocab.update({f"filler{i}": i for i in range(3, 70_000)})  # pushes every real word past 65,535
    vocab.update({w: 70_000 + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "big-tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|padding|>").save_pretrained(str(tok_dir))

    data = tmp_path / "data32"
    assert prepare.main(["--input", str(corpus), "--out", str(data), "--tokenizer", str(tok_dir), "--quiet"]) == 0
    td = TokenData(data)
    ids = np.asarray(td.split("train"))
    assert td.meta["dtype"] == "uint32" and ids.max() >= 70_000 and (ids > 65_535).mean() > 0.9
    assert ids[:5].tolist() == tok.encode(text[:200]).ids[:5]  # read back exactly, not wrapped at 65,536
    run = tmp_path / "r32"
    sets = ["train.max_steps=2", "train.eval_interval=0", "train.eval_windows=2"]
    assert train.main(["--config", str(TINY), "--data", str(data), "--out", str(run), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    config = json.loads((latest_checkpoint(run) / "config.json").read_text())
    assert config["vocab_size"] >= 70_000 + len(words) and all(math.isfinite(r["loss"]) for r in read_metrics(run)[0])
