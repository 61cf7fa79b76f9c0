"""Helpers of the server tests: the tiny random checkpoint builder (benchmarks/tiny.py, re-exported
here), one torch thread per module, the generate() reference for greedy comparisons, and a server
wrapper whose engine steps take at least 10 ms (so requests are surely in flight when a test acts).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.tiny import LINES, build_checkpoint  # noqa: F401 (re-exported for the tests)
from model import MeshForCausalLM

# `python -c SLOW_STEPS ARGS...`: the same CLI, with every engine step that has work slowed to >= 10 ms.
SLOW_STEPS = """
import sys, time
from server import __main__ as cli
from server.engine.engine import Engine
real = Engine.step
def step(self):
    time.sleep(0.01)
    return real(self)
Engine.step = step
sys.exit(cli.main(sys.argv[1:]))
"""
STEP_S = 0.01  # the floor SLOW_STEPS puts under one step


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
