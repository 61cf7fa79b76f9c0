"""Tiny random MeSH checkpoints for the server tests: a byte-level BPE tokenizer trained in-process on a
few lines (the project's own `training.prepare.train_tokenizer`) and a small random model, saved
together with save_pretrained like a real checkpoint. No network, no /work/shared.

``initializer_range=0.2`` keeps random logits far from uniform, so greedy choices are well separated
and different depths give different text (as in tests/test_model.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
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
                     max_position_embeddings: int = 256, seed: int = 0, vocab_size: int = 320) -> Path:
    """Writes tokenizer + random model into `path` (created); returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer([line + "\n" for line in LINES * 20], vocab_size=vocab_size, show_progress=False)
    tok.save_pretrained(str(path))
    kw = dict(DIMS, vocab_size=len(tok), max_position_embeddings=max_position_embeddings,
              eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    if scheme == "vanilla":
        cfg = MeshConfig.from_layout(layout, **kw)
    else:
        cfg = MeshConfig.from_layout(layout, scheme=scheme, max_loops=max_loops, **kw)
    torch.manual_seed(seed)
    MeshForCausalLM(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models are all small operations: extra intra-op threads only add synchronisation (and on a busy
    2-core machine they make tests several times slower). One thread for the module, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MARGIN = 1e-4  # below this top-2 logit gap, float noise between batch shapes may flip a greedy choice


@torch.inference_mode()
def reference_greedy(model: MeshForCausalLM, prompt_ids: list[int], loops: int, max_new_tokens: int) -> tuple[list[int], int]:
    """MeshForCausalLM.generate's greedy continuation (no end-of-text stop) and how many of its tokens
    are reliable: the prefix before the first step whose top-2 logit margin is <= MARGIN."""
    out = model.generate(torch.tensor([prompt_ids]), loops=loops, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    reliable = len(tokens)
    for i, logits in enumerate(out.logits):
        top2 = logits[0].float().topk(2).values
        if float(top2[0] - top2[1]) <= MARGIN:
            reliable = i  # this step's choice may differ, and everything after it with it
            break
    return tokens, reliable


def same_greedy(tokens: list[int], reference: tuple[list[int], int]) -> bool:
    """True when `tokens` agree with the reference on its reliable prefix (and have its length)."""
    ref, reliable = reference
    return len(tokens) == len(ref) and tokens[:reliable] == ref[:reliable]
