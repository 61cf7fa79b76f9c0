"""Checkpoints: a Hugging Face model directory plus the trainer's state, written atomically.

    RUN/checkpoints/step-000200/   config.json, generation_config.json, model.safetensors,
                                   tokenizer files          -> AutoModelForCausalLM / the server load it
                                   trainer_state.pt         optimizer, scheduler, RNG, data position
                                   trainer_state.json       the same numbers, for people
    RUN/latest -> checkpoints/step-000200                   (symlink, swapped atomically)

A checkpoint is written into ``checkpoints/.tmp-...``, fsynced, then renamed into place, and only
then does ``latest`` move. A crash at any point leaves the previous checkpoint readable, and a
directory named ``step-*`` is always complete, so resuming never reads half a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from .common import fsync_dir, fsync_tree, quiet_transformers, replace_dir_atomic, write_json_atomic
from .prepare import copy_tokenizer

STEP_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"


def checkpoint_dir(run: str | Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:07d}"


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def latest_checkpoint(run: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    run = Path(run)
    link = run / "latest"
    if link.is_symlink() or link.is_dir():
        target = link.resolve()
        if is_complete(target):
            return target
    steps = []
    for p in (run / "checkpoints").glob("step-*"):
        m = STEP_RE.match(p.name)
        if m and is_complete(p):
            steps.append((int(m.group(1)), p))
    return max(steps)[1] if steps else None


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a training run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    ckpt = latest_checkpoint(path)
    return ckpt if ckpt is not None else path


def save_checkpoint(run: str | Path, step: int, model, model_state: dict, trainer_state: dict, tokenizer_dir, summary: dict, keep: int) -> Path:
    """Writes checkpoint ``step`` (call on rank 0 only) and points ``latest`` at it."""
    run = Path(run)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run, step)
    tmp = run / "checkpoints" / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    quiet_transformers()
    model.save_pretrained(str(tmp), state_dict=model_state)
    copy_tokenizer(tokenizer_dir, tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    write_json_atomic(tmp / "trainer_state.json", summary)
    fsync_tree(tmp)
    replace_dir_atomic(tmp, final)

    link_tmp = run / f".latest.tmp-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(os.path.relpath(final, run), link_tmp)
    os.replace(link_tmp, run / "latest")
    fsync_dir(run)
    prune(run, keep, final)
    return final


def prune(run: Path, keep: int, current: Path) -> None:
    """Removes all but the newest ``keep`` checkpoints (never the current one) and stale temp dirs."""
    steps = sorted((int(m.group(1)), p) for p in (run / "checkpoints").iterdir() if (m := STEP_RE.match(p.name)))
    for _, p in steps[:-keep]:
        if p != current:
            shutil.rmtree(p, ignore_errors=True)
    for p in (run / "checkpoints").glob(".tmp-*"):
        if str(os.getpid()) not in p.name:  # a crashed writer's leftovers
            shutil.rmtree(p, ignore_errors=True)


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def read_summary(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
