"""torchrun with 2 CPU processes (gloo) trains exactly what one process trains on the same global batch.

The run starts under DDP, stops after 5 steps, and is resumed under FSDP from the DDP checkpoint
(checkpoints hold full, unsharded state, so they move between DDP, FSDP and a single process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from training import prepare, train

from test_training import TINY, make_text

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--set", "train.max_steps=10", "--set", "train.eval_interval=5", "--set", "train.checkpoint_interval=5"]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def records(run: Path):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r], [r for r in recs if "eval" in r]


def test_two_process_ddp_then_fsdp_matches_one_process(tmp_path):
    text = tmp_path / "play.txt"
    text.write_text(make_text(), encoding="utf-8")
    data = tmp_path / "data"
    assert prepare.main(["--input", str(text), "--out", str(data), "--vocab-size", "320", "--quiet"]) == 0

    single = tmp_path / "single"
    assert train.main(["--config", str(TINY), "--data", str(data), "--out", str(single), "--quiet", *STEPS]) == 0

    multi = tmp_path / "multi"
    base = ["--config", str(TINY), "--data", str(data), "--out", str(multi), "--quiet", *STEPS]
    ddp = torchrun(base + ["--stop-after-steps", "5"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es) on cpu with DDP, batch 8 x 32 (micro 4" in ddp.stdout
    fsdp = torchrun(base + ["--set", 'train.parallel="fsdp"'])
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "resuming from" in fsdp.stdout and "2 process(es) on cpu with FSDP" in fsdp.stdout

    got_steps, got_evals = records(multi)
    want_steps, want_evals = records(single)
    assert [r["step"] for r in got_steps] == list(range(1, 11))
    assert [r["loops"] for r in got_steps] == [r["loops"] for r in want_steps]  # every rank drew the same depth
    # Two half-batches averaged by all-reduce vs one full batch: equal up to float rounding.
    np.testing.assert_allclose([r["loss"] for r in got_steps], [r["loss"] for r in want_steps], rtol=1e-5)
    assert [e["step"] for e in got_evals] == [e["step"] for e in want_evals] == [5, 10]  # one eval under each wrapper
    for g, w in zip(got_evals, want_evals):
        np.testing.assert_allclose(list(g["eval"].values()), list(w["eval"].values()), rtol=1e-5)
    assert got_steps[-1]["loss"] < got_steps[0]["loss"] - 1.0
