"""Validation loss of a model at each recursion depth, also per character and per byte.

    python -m training.evaluate --model model/default --text ../shared/data/tinyshakespeare.txt --val-fraction 0.1
    python -m training.evaluate --model runs/tiny --data data/tiny --loops 1,2,3 --json

``--model`` is a model directory (config.json + model.safetensors + tokenizer) or a training run
directory (its latest checkpoint). ``--data`` uses a prepared val.bin and its meta.json counts;
``--text`` tokenizes the last ``--val-fraction`` of a text file with the model's own tokenizer,
exactly as ``training.prepare`` splits and tokenizes it.

The text is cut into consecutive, non-overlapping windows of ``--context`` tokens (default: the
model's max_position_embeddings); every token but the first is predicted once, from the tokens
before it in its window. Token-level loss depends on the tokenizer; nats per character and bits
per byte (total nats over the split's characters / UTF-8 bytes) do not, so they compare models
with different tokenizers, and with character-level models (nanoGPT's shakespeare_char val loss
is in nats per character).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import resolve_model_dir
from .common import UsageError, parse_int_list, pick_device, quiet_transformers, require_file, run_cli
from .data import SplitCounter, TokenData, encode_stream, iter_text, load_tokenizer, same_tokenizer, split_point, split_text


def load_model(path: str | Path, device: torch.device):
    """(model in eval mode, float32, the directory it came from)."""
    import model as _registers_mesh  # noqa: F401  (AutoModel knows model_type "mesh" after this import)
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    directory = resolve_model_dir(path)
    if not (directory / "config.json").is_file():
        raise UsageError(f"no model in {path} (expected config.json + model.safetensors, or a training run directory)")
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).to(device)
    return model.eval(), directory


def val_tokens_from_text(model_dir: Path, text_file, val_fraction: float) -> tuple[np.ndarray, dict]:
    """The validation split of a text file, tokenized with the model's tokenizer, and its counts."""
    paths = [require_file(text_file, "text file")]
    n_chars = sum(len(piece) for piece in iter_text(paths))
    at = split_point(n_chars, val_fraction)
    train_part, val_part = split_text(iter_text(paths), at)
    for _ in train_part:  # the split hands out the val part once the train part is consumed
        pass
    tokenizer = load_tokenizer(model_dir)
    counter = SplitCounter()
    parts = list(encode_stream(tokenizer, counter.wrap(val_part)))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return tokens, {"tokens": len(tokens), "chars": counter.chars, "bytes": counter.bytes}


def val_tokens_from_data(model_dir: Path, data_dir, split: str) -> tuple[np.ndarray, dict]:
    data = TokenData(data_dir)
    if (model_dir / "tokenizer.json").is_file() and not same_tokenizer(model_dir, data.path):
        raise UsageError(f"{data.path} was tokenized with a different tokenizer than the model in {model_dir}")
    return data.split(split), data.counts(split)


@torch.no_grad()
def sequence_nll(model, tokens: np.ndarray, loops: int, context: int, batch_size: int, device, progress: bool = False) -> tuple[float, int]:
    """(total nats, predicted tokens) over consecutive windows of ``context`` tokens."""
    n = len(tokens)
    if n < 2:
        raise UsageError("the evaluation text has fewer than 2 tokens")
    starts = list(range(0, n - 1, context))
    total, count = 0.0, 0
    full = [s for s in starts if s + context + 1 <= n]
    tail = [s for s in starts if s + context + 1 > n]  # the last, shorter window
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in tail]
    for group in tqdm(batches, desc=f"loops={loops}", disable=not progress, leave=False):
        length = min(context, n - 1 - group[0])
        rows = torch.from_numpy(np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in group])).to(device)  # (B, L+1)
        logits = model(input_ids=rows[:, :-1], loops=loops, use_cache=False).logits  # (B, L, V)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += rows[:, 1:].numel()
    return total, count


def evaluate(model, tokens, counts: dict, loops_list, context: int, batch_size: int, device, progress: bool = False) -> list[dict]:
    """One row per depth: loss (nats/token), perplexity, nats per char, bits per byte."""
    rows = []
    for k in loops_list:
        t0 = time.perf_counter()
        total, count = sequence_nll(model, tokens, k, context, batch_size, device, progress)
        loss = total / count
        # Per-character figures: the mean token loss times tokens per character of the split
        # (the first token of each window is not predicted, so a count ratio, not the raw total).
        tokens_per_char = counts["tokens"] / counts["chars"]
        tokens_per_byte = counts["tokens"] / counts["bytes"]
        rows.append(
            {
                "loops": k,
                "loss": loss,
                "perplexity": math.exp(loss),
                "nats_per_char": loss * tokens_per_char,
                "bits_per_byte": loss * tokens_per_byte / math.log(2),
                "tokens": count,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| loops | loss (nats/token) | perplexity | nats/char | bits/byte |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['loops']} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['nats_per_char']:.4f} | {r['bits_per_byte']:.4f} |")
    return "\n".join(lines)


def parse_loops(text: str | None, max_loops: int) -> list[int]:
    if not text:
        return list(range(1, max_loops + 1))
    return parse_int_list(text, "--loops", 1, max_loops)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Validation loss, perplexity, nats/char and bits/byte of a model at each recursion depth.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model directory, or a training run directory (uses its latest checkpoint)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="prepared data directory (training.prepare); evaluates its val.bin")
    src.add_argument("--text", metavar="FILE", help="text file; evaluates its last --val-fraction with the model's tokenizer")
    p.add_argument("--val-fraction", type=float, default=0.1, help="with --text: the held-out tail of the text (default 0.1)")
    p.add_argument("--split", default="val", choices=("val", "train"), help="with --data: which split (default val)")
    p.add_argument("--loops", help="depths: a range or a comma list, e.g. 1-4 or 1,3 (default: 1..max_loops)")
    p.add_argument("--context", type=int, default=0, help="window length in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        device = pick_device(args.device)
        model, directory = load_model(args.model, device)
        loops = parse_loops(args.loops, model.config.max_loops)
        context = args.context or model.config.max_position_embeddings
        if not 1 <= context <= model.config.max_position_embeddings:
            raise UsageError(f"--context must be in [1, {model.config.max_position_embeddings}], got {context}")
        if args.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        if args.text:
            tokens, counts = val_tokens_from_text(directory, args.text, args.val_fraction)
        else:
            tokens, counts = val_tokens_from_data(directory, args.data, args.split)
        rows = evaluate(model, tokens, counts, loops, context, args.batch_size, device, progress=not args.quiet)
        if args.json:
            print(json.dumps({"model": str(directory), "context": context, "counts": counts, "results": rows}, indent=2))
        else:
            print(f"{directory}: {counts['tokens']:,} tokens, {counts['chars']:,} chars, {counts['bytes']:,} bytes, context {context}")
            print(format_table(rows))

    return run_cli("evaluate", body)


if __name__ == "__main__":
    raise SystemExit(main())
