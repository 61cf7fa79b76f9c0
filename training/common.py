"""Small pieces every training script shares: CLI errors, atomic file writes, device choice."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from model.device import resolve_device


class UsageError(Exception):
    """Bad input from the user (missing file, bad config value): printed as one line, exit code 2."""


def run_cli(prog: str, fn: Callable[[], int | None]) -> int:
    """Runs a CLI body; user errors become ``prog: error: message`` on stderr and exit code 2."""
    try:
        return fn() or 0
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def quiet_transformers() -> None:
    """Turns off transformers' own progress bars (weight loading/saving): ours say what is going on."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes a rename or file creation inside ``path`` durable (POSIX needs the directory fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsyncs every file below ``path`` and the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes a file so a reader sees either the old or the new content, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def replace_dir_atomic(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Moves a fully written (and fsynced) directory ``tmp`` to ``final``, replacing what was there.

    POSIX cannot rename over a non-empty directory, so the old one is moved aside first; a crash in
    between leaves ``final.old`` next to ``tmp``, both complete, and never a half-written ``final``.
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def pick_device(name: str = "auto") -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Checks a user-given input file exists, is a file and is not empty."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} not found: {p}")
    if not p.is_file():
        raise UsageError(f"{what} is not a file: {p}")
    if p.stat().st_size == 0:
        raise UsageError(f"{what} is empty: {p}")
    return p


def parse_int_list(text: str, name: str, lo: int = 1, hi: int | None = None) -> list[int]:
    """``1-6``, ``1,3,5`` or a mix (``1-3,6``) -> sorted distinct integers, each checked against [lo, hi]."""
    out: set[int] = set()
    for part in str(text).split(","):
        a, dash, b = part.strip().partition("-")
        try:
            first, last = int(a), int(b) if dash else int(a)
        except ValueError:
            raise UsageError(f"{name} expects integers, ranges like 1-6 or lists like 1,3,5, got {text!r}") from None
        if first > last:
            raise UsageError(f"{name}: the range {part.strip()!r} is empty")
        out.update(range(first, last + 1))
    for k in sorted(out):
        if k < lo or (hi is not None and k > hi):
            raise UsageError(f"{name} {k} is outside [{lo}, {hi if hi is not None else 'inf'}]")
    return sorted(out)
