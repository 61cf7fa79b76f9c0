"""Token data: text streaming, the train/val split, tokenizer I/O, token memmaps and batches.

A prepared data directory (``training.prepare``) holds

    tokenizer.json (+ tokenizer_config.json)   Hugging Face tokenizer files
    train.bin, val.bin                         flat token ids, uint16 (vocab <= 65536) or uint32
    meta.json                                  dtype, vocab size, special ids and per-split counts of
                                               tokens, characters and UTF-8 bytes

The validation split is the last ``val_fraction`` of the text, by characters (the nanoGPT
convention). Batches are random windows whose offsets are a pure function of (seed, step), so a
resumed run and every data-parallel rank see exactly the batches an uninterrupted single process
would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .common import UsageError

READ_CHARS = 1 << 20  # read text files 1M characters at a time
ENCODE_CHARS = 1 << 16  # encode in pieces of ~64K characters, cut after a newline
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
def iter_text(paths: Iterable[str | Path]) -> Iterator[str]:
    """Streams the concatenation of text files; a file not ending in a newline gets one."""
    for path in paths:
        last = "\n"
        with open(path, encoding="utf-8") as f:
            while piece := f.read(READ_CHARS):
                last = piece[-1]
                yield piece
        if last != "\n":
            yield "\n"


def count_chars(paths: Iterable[str | Path]) -> int:
    return sum(len(piece) for piece in iter_text(paths))


def split_point(n_chars: int, val_fraction: float) -> int:
    """Character index where the validation split (the last ``val_fraction`` of the text) begins."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    return n_chars - int(round(n_chars * val_fraction))


def split_text(pieces: Iterable[str], at: int) -> tuple[Iterator[str], Iterator[str]]:
    """Splits a piece stream at character ``at``; the train part must be consumed before the val part."""
    pieces = iter(pieces)
    tail: list[str] = []

    def head() -> Iterator[str]:
        seen = 0
        for piece in pieces:
            if seen + len(piece) <= at:
                seen += len(piece)
                yield piece
                continue
            cut = at - seen
            if cut:
                yield piece[:cut]
            tail.append(piece[cut:])
            return

    def rest() -> Iterator[str]:
        yield from tail
        yield from pieces

    return head(), rest()


def encode_pieces(pieces: Iterable[str]) -> Iterator[str]:
    """Re-cuts a text stream into encode units: the first newline at or after ENCODE_CHARS.

    The cut points depend only on the text (not on how it was read), so the same text always
    tokenizes the same way: prepare's val.bin and ``evaluate --text`` give identical tokens.
    """
    buf = ""
    for piece in pieces:
        buf += piece
        while len(buf) > ENCODE_CHARS:
            cut = buf.find("\n", ENCODE_CHARS)
            if cut < 0:
                break
            yield buf[: cut + 1]
            buf = buf[cut + 1 :]
    if buf:
        yield buf


class SplitCounter:
    """Counts characters and UTF-8 bytes of the text that streams through it."""

    def __init__(self):
        self.chars = 0
        self.bytes = 0

    def wrap(self, pieces: Iterable[str]) -> Iterator[str]:
        for piece in pieces:
            self.chars += len(piece)
            self.bytes += len(piece.encode("utf-8"))
            yield piece


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------
def load_tokenizer(path: str | Path):
    """A ``PreTrainedTokenizerFast`` from a directory holding tokenizer.json (ours, Pythia's, ...)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise UsageError(f"no tokenizer.json in {path} (a fast Hugging Face tokenizer directory is needed)")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_stream(tokenizer, pieces: Iterable[str], batch: int = 16) -> Iterator[np.ndarray]:
    """Token ids of a text stream (no special tokens added), in arrays of a few batches of pieces."""
    backend = tokenizer.backend_tokenizer
    units: list[str] = []
    for unit in encode_pieces(pieces):
        units.append(unit)
        if len(units) == batch:
            yield np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in backend.encode_batch(units, add_special_tokens=False)])
            units = []
    if units:
        yield np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in backend.encode_batch(units, add_special_tokens=False)])


def encode_text(tokenizer, text: str) -> np.ndarray:
    parts = list(encode_stream(tokenizer, [text]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def same_tokenizer(dir_a: str | Path, dir_b: str | Path) -> bool:
    """True when two directories' tokenizer.json files define the same model (vocab and merges)."""
    a = json.loads((Path(dir_a) / "tokenizer.json").read_text(encoding="utf-8"))
    b = json.loads((Path(dir_b) / "tokenizer.json").read_text(encoding="utf-8"))
    return a.get("model") == b.get("model") and a.get("added_tokens") == b.get("added_tokens")


# ---------------------------------------------------------------------------------------------
# Prepared data
# ---------------------------------------------------------------------------------------------
class TokenData:
    """A prepared data directory: ``TokenData(dir).split("train")`` is a read-only memmap."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise UsageError(f"{self.path} is not a prepared data directory (no meta.json; run python -m training.prepare)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.dtype = np.dtype(self.meta["dtype"])
        self._splits: dict[str, np.ndarray] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def split(self, name: str) -> np.ndarray:
        if name not in self._splits:
            path = self.path / f"{name}.bin"
            if not path.is_file():
                raise UsageError(f"missing {path}")
            self._splits[name] = np.memmap(path, dtype=self.dtype, mode="r")
        return self._splits[name]

    def counts(self, name: str) -> dict:
        return self.meta[name]


def _rng(seed: int, step: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, stream])))


def batch_offsets(n_tokens: int, seq_len: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Start offsets of the global batch of ``step``: a pure function of (seed, step)."""
    if n_tokens < seq_len + 2:
        raise UsageError(f"the training split has {n_tokens} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    return _rng(seed, step, 0xB47C).integers(0, n_tokens - seq_len - 1, size=batch_size)


def windows(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and next-token targets y, both (len(offsets), seq_len) int64."""
    rows = np.stack([np.asarray(tokens[o : o + seq_len + 1], dtype=np.int64) for o in offsets])  # (B, T+1)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


def eval_offsets(n_tokens: int, seq_len: int, count: int) -> np.ndarray:
    """``count`` evenly spaced windows over a split: the same every eval, so evals compare."""
    last = n_tokens - seq_len - 1
    if last < 0:
        raise UsageError(f"the validation split has {n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    return np.linspace(0, last, num=count).round().astype(np.int64)
