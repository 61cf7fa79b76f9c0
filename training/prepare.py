"""Text files -> byte-level BPE tokenizer -> train.bin / val.bin token memmaps + meta.json.

    python -m training.prepare --input shakespeare.txt --out data/shakespeare --vocab-size 4096
    python -m training.prepare --input a.txt b.txt --out data/ab --tokenizer path/to/pythia  # reuse

The files are read as one UTF-8 text (in order; each file ends with a newline); the validation
split is its last ``--val-fraction`` by characters. A new tokenizer is trained on the training
split only. Inputs are streamed: memory does not grow with the size of the text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

from tqdm import tqdm

from .common import UsageError, require_file, run_cli, write_json_atomic
from .data import (
    SplitCounter,
    count_chars,
    encode_pieces,
    encode_stream,
    iter_text,
    load_tokenizer,
    split_point,
    split_text,
    token_dtype,
)

EOS_TOKEN = "<|endoftext|>"  # id 0, as in GPT-NeoX/Pythia: ends a document; generation stops on it
PAD_TOKEN = "<|padding|>"  # id 1, as in GPT-NeoX/Pythia: batch padding, never trained on


def train_tokenizer(pieces, vocab_size: int, show_progress: bool = True):
    """A byte-level BPE tokenizer (GPT-2 style: no unknown tokens, any UTF-8 text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    n_special = 2
    min_vocab = 256 + n_special
    if vocab_size < min_vocab:
        raise UsageError(f"--vocab-size must be at least {min_vocab} (256 bytes + {n_special} special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(encode_pieces(pieces), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=1 << 30
    )


def sources(paths) -> list[dict]:
    """Name, size and sha256 of each input: meta.json records what the data was built from."""
    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        out.append({"path": str(p), "bytes": os.path.getsize(p), "sha256": h.hexdigest()})
    return out


def is_prepared(out: str | Path, inputs, vocab_size: int | None, val_fraction: float, tokenizer_dir=None) -> bool:
    """True when ``out`` already holds data built from these exact inputs and settings."""
    meta_path = Path(out) / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    want = [s["sha256"] for s in sources(inputs)]
    return (
        [s["sha256"] for s in meta.get("sources", [])] == want
        and meta.get("val_fraction") == val_fraction
        and meta.get("tokenizer_source") == (str(tokenizer_dir) if tokenizer_dir else "trained")
        and (tokenizer_dir is not None or meta.get("requested_vocab_size") == vocab_size)
    )


def prepare(inputs, out, vocab_size: int | None = 4096, val_fraction: float = 0.1, tokenizer_dir=None, progress: bool = True) -> dict:
    """Builds a data directory; returns its meta dict. meta.json is written last (it marks completion)."""
    inputs = [require_file(p, "input file") for p in inputs]
    if not inputs:
        raise UsageError("no input files given")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the directory is incomplete until meta.json is back

    n_chars = count_chars(inputs)
    if n_chars == 0:
        raise UsageError("the input files contain no text")
    at = split_point(n_chars, val_fraction)
    if at == 0 or at == n_chars:
        raise UsageError(f"the text ({n_chars} characters) is too short to split with --val-fraction {val_fraction}")

    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        if vocab_size is None:
            raise UsageError("give --vocab-size (to train a tokenizer) or --tokenizer DIR (to reuse one)")
        train_part, _ = split_text(iter_text(inputs), at)
        tokenizer = train_tokenizer(train_part, vocab_size, show_progress=progress)
    tokenizer.save_pretrained(str(out))
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)

    meta = {
        "vocab_size": vocab,
        "dtype": dtype.name,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "val_fraction": val_fraction,
        "tokenizer_source": str(tokenizer_dir) if tokenizer_dir else "trained",
        "requested_vocab_size": None if tokenizer_dir else vocab_size,
        "sources": sources(inputs),
    }
    train_part, val_part = split_text(iter_text(inputs), at)
    bar = tqdm(total=n_chars, unit="char", unit_scale=True, desc="tokenizing", disable=not progress)
    for name, part in (("train", train_part), ("val", val_part)):
        counter = SplitCounter()
        tmp = out / f".{name}.bin.tmp"
        n_tokens = 0
        with open(tmp, "wb") as f:
            for ids in encode_stream(tokenizer, counter.wrap(part)):
                ids.astype(dtype).tofile(f)
                n_tokens += len(ids)
                bar.update(counter.chars - bar.n + (0 if name == "train" else at))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / f"{name}.bin")
        meta[name] = {"tokens": n_tokens, "chars": counter.chars, "bytes": counter.bytes}
    bar.close()
    if meta["val"]["tokens"] < 2:
        raise UsageError("the validation split has fewer than 2 tokens; use more text or a larger --val-fraction")
    write_json_atomic(out / "meta.json", meta)
    return meta


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Copies the tokenizer files a model directory needs (AutoTokenizer loads them)."""
    from .data import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.prepare",
        description="Tokenize text files into train.bin / val.bin token memmaps (+ tokenizer files and meta.json).",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s), read in order")
    p.add_argument("--out", required=True, metavar="DIR", help="output data directory")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size incl. 2 special tokens (default 4096)")
    p.add_argument("--tokenizer", metavar="DIR", help="reuse this tokenizer (a directory with tokenizer.json) instead of training one")
    p.add_argument("--val-fraction", type=float, default=0.1, help="the last fraction of the text held out for validation (default 0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        meta = prepare(args.input, args.out, args.vocab_size, args.val_fraction, args.tokenizer, progress=not args.quiet)
        t, v = meta["train"], meta["val"]
        print(
            f"wrote {args.out}: vocab {meta['vocab_size']} ({meta['dtype']}), train {t['tokens']:,} tokens / {t['chars']:,} chars, "
            f"val {v['tokens']:,} tokens / {v['chars']:,} chars"
        )

    return run_cli("prepare", body)


if __name__ == "__main__":
    raise SystemExit(main())
