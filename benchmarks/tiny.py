"""Tiny random MeSH checkpoints: a byte-level BPE tokenizer trained in-process on a few lines (the
project's own `training.prepare.train_tokenizer`) and a small random model, saved together with
save_pretrained like a real checkpoint. No network, no /work/shared. The server tests serve them, and
scripts fall back to them when model/default is missing.

``initializer_range=0.2`` keeps random logits far from uniform, so greedy choices are well separated
and different depths give different text (as in tests/test_model.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model import MeshConfig, MeshForCausalLM
from training.prepare import train_tokenizer

LINES = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak.",
    "First Citizen: You are all resolved rather to die than to famish?",
    "All: Resolved. resolved.",
    "The quick brown fox jumps over the lazy dog; naïve café, 東京 and emoji 🙂 too.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
]
DIMS = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, initializer_range=0.2)


def build_checkpoint(path: str | Path, layout: str = "1+1R2+1", scheme: str = "mesh", max_loops: int = 4,
                     max_position_embeddings: int = 256, seed: int = 0, vocab_size: int = 320, **config) -> Path:
    """Writes tokenizer + random model into `path` (created); returns the path. `config`: other MeshConfig
    fields (e.g. coda_read_routers=True)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer([line + "\n" for line in LINES * 20], vocab_size=vocab_size, show_progress=False)
    tok.save_pretrained(str(path))
    kw = dict(DIMS, vocab_size=len(tok), max_position_embeddings=max_position_embeddings,
              eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, **config)
    if scheme == "vanilla":
        cfg = MeshConfig.from_layout(layout, **kw)
    else:
        cfg = MeshConfig.from_layout(layout, scheme=scheme, max_loops=max_loops, **kw)
    torch.manual_seed(seed)
    MeshForCausalLM(cfg).save_pretrained(str(path))
    return path
