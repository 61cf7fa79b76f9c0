"""Training survives `kill -9`: a real `python -m training.train` subprocess is SIGKILLed while it writes
a checkpoint (twice: inside its very first checkpoint write, then mid-run), and the same command rerun
resumes from the last complete checkpoint, never reads the half-written one, and ends with exactly
the losses of an uninterrupted run started next to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_training import TINY, VOCAB, make_text
from training import prepare
from training.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24  # tiny.toml's model and data; evals at 12 and 24


def train_cmd(data: Path, out: Path) -> list[str]:
    # A checkpoint every step: most of a tiny step is the checkpoint write, so the kill lands inside one.
    return [sys.executable, "-m", "training.train", "--config", str(TINY), "--data", str(data), "--out", str(out),
            "--quiet", "--set", "train.checkpoint_interval=1", "--set", "train.threads=1",
            "--set", f"train.max_steps={STEPS}", "--set", "train.eval_interval=12"]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


# The same training command, but the process stops itself (SIGSTOP) inside its first checkpoint write,
# after the weights went to the temp dir and before it is renamed into place, so the kill lands there
# on any machine, however fast or busy.
STOP_IN_FIRST_WRITE = """
import os, signal, sys
from training import checkpoint, train
copy = checkpoint.copy_tokenizer
def stop_then_copy(src, dst):
    os.kill(os.getpid(), signal.SIGSTOP)
    copy(src, dst)
checkpoint.copy_tokenizer = stop_then_copy
sys.exit(train.main(sys.argv[1:]))
"""


def wait_stopped(proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint write"
        if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.01)
    raise AssertionError("the run never reached its first checkpoint write")


def kill_while_writing(proc: subprocess.Popen, run: Path, after_step: int, timeout: float = 120) -> None:
    """SIGKILLs `proc` as soon as a checkpoint later than `after_step` is half-written (its temp dir exists)."""
    ckpts = run / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run finished before it could be killed"
        if ckpts.is_dir():
            for p in os.scandir(ckpts):
                if p.name.startswith(".tmp-step-") and int(p.name.split("-")[2]) > after_step:
                    proc.send_signal(signal.SIGKILL)
                    assert proc.wait(timeout=30) == -signal.SIGKILL
                    return
        time.sleep(0.0005)
    raise AssertionError("no checkpoint write seen")


def losses(run: Path) -> tuple[list, list]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["loops"]) for r in recs if "loss" in r], [(r["step"], r["eval"]) for r in recs if "eval" in r]


def test_training_survives_kill_9_and_matches_an_uninterrupted_run(tmp_path):
    corpus = tmp_path / "play.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    data = tmp_path / "data"
    assert prepare.main(["--input", str(corpus), "--out", str(data), "--vocab-size", str(VOCAB), "--quiet"]) == 0
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    reference = start(train_cmd(data, ref), tmp_path / "ref.log")  # runs alongside the killed one

    # 1. Killed inside its very first checkpoint write: nothing complete yet, so the rerun starts over.
    proc = start([sys.executable, "-c", STOP_IN_FIRST_WRITE, *train_cmd(data, run)[3:]], tmp_path / "1.log")
    wait_stopped(proc)
    half = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-step-0000001-")]
    assert half and (run / "checkpoints" / half[0] / "model.safetensors").is_file(), "stopped mid-write"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert latest_checkpoint(run) is None and not (run / "latest").exists()

    # 2. The same command: starts from scratch (no complete checkpoint); killed again inside a later write.
    proc = start(train_cmd(data, run), tmp_path / "2.log")
    kill_while_writing(proc, run, after_step=8)
    assert "resuming from" not in (tmp_path / "2.log").read_text()
    last = latest_checkpoint(run)
    assert last is not None and 8 <= int(last.name.split("-")[1]) < STEPS

    # 3. The same command again: resumes from the last complete checkpoint and finishes.
    out = subprocess.run(train_cmd(data, run), cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resuming from {last}" in out.stdout
    assert reference.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()

    got_steps, got_evals = losses(run)
    want_steps, want_evals = losses(ref)
    assert [s for s, _, _ in got_steps] == list(range(1, STEPS + 1)), "each step logged once: the killed steps were redone"
    assert got_steps == want_steps, "the same losses and depths, step by step, as the uninterrupted run"
    assert got_evals == want_evals and [s for s, _ in got_evals] == [12, STEPS]
    assert latest_checkpoint(run).name == f"step-{STEPS:07d}"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")], "stale temp dirs removed"
