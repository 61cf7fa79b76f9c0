"""The ablation driver end to end on a tiny generated text: train, evaluate, probe, tables, figures, resume."""

from __future__ import annotations

import json
import math
import random

import pytest

from training.experiments import ablation

MICRO = [
    "--variants", "vanilla,mesh",
    "--seeds", "1",
    "--hidden-size", "32",
    "--heads", "2",
    "--seq-len", "32",
    "--batch-size", "4",
    "--steps", "4",
    "--vocab-size", "300",
    "--diag-windows", "2",
    "--threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    rng = random.Random(0)
    words = "the king queen lord said thou art my good friend and to be or not this that what is now come go".split()
    text = root / "tiny.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600)) + "\n", encoding="utf-8")
    out, docs = root / "out", root / "docs"
    rc = ablation.main(["--text", str(text), "--out", str(out), "--docs", str(docs), *MICRO])
    return rc, text, out, docs


def test_runs_end_to_end_with_finite_numbers(study):
    rc, _, out, docs = study
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"vanilla", "mesh"}
    for name, e in summary["variants"].items():
        for key in ("loss", "perplexity", "nats_per_char"):
            mean, std, n = e[key]
            assert math.isfinite(mean) and mean > 0 and n == 1 and std == 0.0, (name, key, e[key])
        assert e["params_non_embedding"] > 0
    # A 4-step model is still close to uniform over the 300-token vocabulary.
    assert summary["variants"]["vanilla"]["loss"][0] < math.log(320) + 0.5
    # mesh is trained at K=2 and evaluated at every depth 1..4 (the elasticity study).
    assert sorted(summary["variants"]["mesh"]["by_depth"]) == ["1", "2", "3", "4"]
    # The recursive model has fewer non-embedding parameters; its unused router pairs are not counted.
    v, m = summary["variants"]["vanilla"], summary["variants"]["mesh"]
    assert m["params_non_embedding"] < m["params_non_embedding_stored"] < v["params_non_embedding"]
    diag = m["diagnostics"]
    assert diag["blocks"] == ["prelude", "core 1", "core 2", "coda"] and diag["windows"] == 2
    assert all(0 <= x <= 2 for x in diag["update_magnitude_mean"])

    report = (out / "report.md").read_text()
    assert "| vanilla | `6` | vanilla |" in report and "| mesh | `1+2R2+1` | mesh |" in report
    assert "Depth elasticity" in report
    for name in ("curves", "elasticity", "update_magnitude", "cka", "spectra"):
        png = docs / f"ablation_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_rerun_skips_finished_runs(study, capsys):
    _, text, out, _ = study
    result = out / "runs" / "mesh" / "seed-0" / "result.json"
    before = result.stat().st_mtime_ns
    assert ablation.main(["--text", str(text), "--out", str(out), *MICRO]) == 0
    assert "2 of 2 runs already complete; 0 to go" in capsys.readouterr().out
    assert result.stat().st_mtime_ns == before


def test_other_settings_into_the_same_study_are_refused(study, capsys):
    _, text, out, _ = study
    argv = ["--text", str(text), "--out", str(out), *MICRO]
    argv[argv.index("--hidden-size") + 1] = "64"
    assert ablation.main(argv) == 2
    assert "other settings (hidden_size)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "vanilla,nope"], "unknown variant(s) nope"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--hidden-size", "30", "--heads", "4"], "not divisible"),
        (["--shard", "3/2"], "--shard 3/2"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 50, encoding="utf-8")
    assert ablation.main(["--text", str(text), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ablation: error:") and message in err and "\n" not in err


def test_missing_text_file(tmp_path, capsys):
    assert ablation.main(["--text", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "text file not found" in capsys.readouterr().err
