"""Where a training run's batches come from: windows of a prepared token file, or chains problems.

Both hand out the rows ``lo:hi`` of the global batch of a step as a pure function of (seed, step)
(plus, for chains, the curriculum level, which checkpoints save), so every data-parallel rank and a
resumed run see the same batches. Labels are next-token ids, IGNORE where the loss skips a position.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .common import UsageError, write_json_atomic
from .data import TokenData, batch_offsets, eval_offsets, windows
from .tasks import chains

IGNORE = chains.IGNORE


class WindowSource:
    """Random windows of ``seq_len`` tokens from DATA_DIR/train.bin (every position labelled)."""

    kind = "random-windows"

    def __init__(self, data_cfg: dict, tc):
        if not data_cfg.get("dir"):
            raise UsageError("no data directory: pass --data DIR or set data.dir in the config")
        self.data = TokenData(data_cfg["dir"])
        self.train, self.val = self.data.split("train"), self.data.split("val")
        self.tc = tc
        self.meta = self.data.meta
        self.tokenizer_dir = self.data.path
        self.val_offsets = eval_offsets(len(self.val), tc.seq_len, tc.eval_windows)

    def batch(self, step: int, lo: int, hi: int):
        offsets = batch_offsets(len(self.train), self.tc.seq_len, self.tc.batch_size, self.tc.seed, step)
        x, y = windows(self.train, offsets[lo:hi], self.tc.seq_len)
        return x, y, None

    def eval_batches(self, rank: int, world: int, batch: int):
        mine = self.val_offsets[rank::world]
        for i in range(0, len(mine), batch):
            yield windows(self.val, mine[i : i + batch], self.tc.seq_len)

    def nats_per_char(self, losses: dict) -> dict:
        chars_per_token = self.meta["val"]["chars"] / self.meta["val"]["tokens"]
        return {str(k): v / chars_per_token for k, v in losses.items()}

    def state_dict(self) -> dict:
        return {"sampler": self.kind, "seed": self.tc.seed, "dir": str(self.data.path)}

    def load_state_dict(self, state: dict) -> None:
        pass

    def observe(self, counts) -> None:
        pass

    def level_counts(self, y, pred, hops):
        return None

    def max_loops(self, max_loops: int, step: int = 0) -> int:
        return max_loops


CHAINS_KEYS = {
    "task": "chains", "queries": 8, "replace": True, "max_hops": 8, "start_hops": 1, "advance_at": 0.9, "ema": 0.9, "loops_per_hop": 0.0,
    "assignment_labels": False, "offset_stages": [9], "uncapped_every": 0, "max_offset": 9, "zero_literal_rows": 0.0, "copy_rows": 0.0,
    "mix_hops": "level",
}


class ChainsSource:
    """Chains problems (training/tasks/chains.py), one per row, right-padded; only answer digits labelled.

    Curriculum: a row's target has ``level`` hops half the time, else 1..level-1 hops (always 1 at
    level 1). The level starts at data.start_hops and goes up by one, up to data.max_hops, once the
    running accuracy (EMA with factor data.ema) of the first answer of level-hop rows at the step's
    deepest depth reaches data.advance_at: it waits for each hop count to be learned. Only first
    answers count: a later query may repeat a variable and copy its answer. With data.loops_per_hop
    > 0 a step runs at most ceil(level * loops_per_hop) loops, so the cheap shallow steps come first.
    With data.assignment_labels every assignment token is also labelled with the variable it defines
    (`chains.training_row`), the auxiliary target without which no run here learned the lookup.

    data.offset_stages (e.g. [0, 9]) splits each level from 2 on into stages: its level-hop rows
    first have D <= 0 in every ``x=y+D`` (copy chains: following the chain is all there is to
    learn), then, once those are learned, D up to the next entry (the arithmetic on top of the
    routing). Rows with fewer hops have any D up to data.max_offset, which (default 9) caps D in every row and
    stage (0: copy chains only, the problem set on which the routing alone is learned). With data.uncapped_every = N every N-th step ignores the depth cap, so the deeper
    depths the curriculum has not reached yet are trained too (to keep the answer, at least).

    data.zero_literal_rows and data.copy_rows are the fractions of rows whose problem has every
    literal 0 (the answer is the signed sum of its chain's offsets) or every D 0 (a copy chain): the
    two halves of a k-hop answer, each learnable alone, which together moved the task's 2-hop
    problems off chance where nothing else did (docs/DEPTH.md section 4b). The curriculum counts only
    the other rows, the task's own problems. A mixed row's hop count is drawn like a task row's (data.mix_hops = "level") or uniformly from 1..data.max_hops ("all": copy chains of every
    length keep the chain following, and zero-literal rows of 3 hops on add two offsets, which no row
    below 3 hops asks for). With both fractions at 0 no extra random number is drawn, so runs from
    before these settings draw the same batches.
    """

    kind = "chains"

    def __init__(self, data_cfg: dict, tc, out: Path):
        unknown = set(data_cfg) - set(CHAINS_KEYS) - {"dir"}
        if unknown:
            raise UsageError(f"unknown data setting data.{sorted(unknown)[0]} for task chains (expected {', '.join(CHAINS_KEYS)})")
        c = {**CHAINS_KEYS, **data_cfg}
        if not 1 <= c["start_hops"] <= c["max_hops"] <= chains.MAX_HOPS:
            raise UsageError(f"data.start_hops and data.max_hops must satisfy 1 <= start_hops <= max_hops <= {chains.MAX_HOPS}")
        stages = c["offset_stages"]
        if not isinstance(stages, list) or not stages or any(not isinstance(d, int) or not 0 <= d <= 9 for d in stages) or stages != sorted(stages):
            raise UsageError(f"data.offset_stages must be a non-empty increasing list of digits 0..9, got {stages!r}")
        if isinstance(c["max_offset"], bool) or not isinstance(c["max_offset"], int) or not 0 <= c["max_offset"] <= 9:
            raise UsageError(f"data.max_offset must be a digit 0..9, got {c['max_offset']!r}")
        mix = (c["zero_literal_rows"], c["copy_rows"])
        if any(isinstance(f, bool) or not isinstance(f, (int, float)) or f < 0 for f in mix) or sum(mix) > 1:
            raise UsageError(f"data.zero_literal_rows and data.copy_rows must be fractions with a sum of at most 1, got {mix[0]!r} and {mix[1]!r}")
        if c["mix_hops"] not in ("level", "all"):
            raise UsageError(f"data.mix_hops must be 'level' or 'all', got {c['mix_hops']!r}")
        if c["queries"] < 1 or not 0 < c["advance_at"] <= 1 or not 0 <= c["ema"] < 1:
            raise UsageError("data.queries must be >= 1, data.advance_at in (0, 1], data.ema in [0, 1)")
        self.c, self.tc = c, tc
        self.level, self.acc = c["start_hops"], 0.0
        self.max_offset = self._first_offset(self.level)
        self.meta = {"vocab_size": len(chains.VOCAB), "bos_token_id": chains.EOS_ID, "eos_token_id": chains.EOS_ID, "pad_token_id": chains.PAD_ID}
        self.tokenizer_dir = Path(out) / "tokenizer"
        if not (self.tokenizer_dir / "tokenizer.json").is_file():
            chains.char_tokenizer().save_pretrained(str(self.tokenizer_dir))
            write_json_atomic(self.tokenizer_dir / "meta.json", self.meta)

    def _first_offset(self, level: int) -> int:
        top = self.c["max_offset"]
        return min(self.c["offset_stages"][0], top) if level >= 2 else top

    def _hops(self, rng) -> int:
        if self.level == 1 or rng.random() < 0.5:
            return self.level
        return int(rng.integers(1, self.level))

    def _kind(self, rng) -> str:
        """The row's problem kind: "task", "zero_literal" or "copy" (no draw when both fractions are 0)."""
        zero, copy = self.c["zero_literal_rows"], self.c["copy_rows"]
        if zero + copy == 0:
            return "task"
        u = rng.random()
        return "zero_literal" if u < zero else "copy" if u < zero + copy else "task"

    def _row(self, rng):
        hops = self._hops(rng)
        kind = self._kind(rng)
        if kind != "task" and self.c["mix_hops"] == "all":
            hops = int(rng.integers(1, self.c["max_hops"] + 1))
        cap = 0 if kind == "copy" else self.max_offset if hops == self.level else self.c["max_offset"]
        row = chains.training_row(rng, hops, self.c["queries"], self.c["replace"], self.c["assignment_labels"], cap, zero_literals=kind == "zero_literal")
        return row, kind == "task"

    def batch(self, step: int, lo: int, hi: int):
        rows, task = [], []
        for i in range(lo, hi):
            row, is_task = self._row(chains.rng_for("train", self.tc.seed, step * self.tc.batch_size + i))
            rows.append(row)
            task.append(is_task)
        T = max(len(ids) for ids, _, _ in rows)
        x = torch.full((len(rows), T), chains.PAD_ID)
        y = torch.full((len(rows), T), IGNORE)
        hops = torch.zeros((len(rows), T), dtype=torch.long)
        for r, (ids, labels, answers) in enumerate(rows):
            x[r, : len(ids)] = torch.tensor(ids)
            y[r, : len(labels)] = torch.tensor(labels)
            first, first_hops = answers[0]
            if task[r]:  # the first answer (it cannot copy an earlier one) of the task's own problems
                hops[r, first] = first_hops
        return x, y, hops

    def max_loops(self, max_loops: int, step: int = 0) -> int:
        """The deepest depth step ``step`` may run at the current level."""
        every = self.c["uncapped_every"]
        if self.c["loops_per_hop"] <= 0 or (every > 0 and step % every == every - 1):
            return max_loops
        return max(1, min(max_loops, math.ceil(self.level * self.c["loops_per_hop"])))

    def level_counts(self, y, pred, hops) -> torch.Tensor:
        """(correct, count) of this batch's first answers with ``level`` hops."""
        sel = hops == self.level
        return torch.stack([(pred[sel] == y[sel]).sum(), sel.sum()]).double()

    def observe(self, counts) -> None:
        correct, n = (float(v) for v in counts)
        if n == 0:
            return
        self.acc = self.c["ema"] * self.acc + (1 - self.c["ema"]) * correct / n
        if self.acc < self.c["advance_at"]:
            return
        top = self.c["max_offset"]
        if self.max_offset < top:  # the chains of this stage are learned: now larger offsets
            self.max_offset, self.acc = min([d for d in self.c["offset_stages"] if self.max_offset < d <= top] or [top]), 0.0
        elif self.level < self.c["max_hops"]:
            self.level, self.acc = self.level + 1, 0.0
            self.max_offset = self._first_offset(self.level)

    def curriculum(self) -> dict:
        """What metrics.jsonl logs each record: the level, its stage, the running accuracy."""
        return {"hops": self.level, "max_offset": self.max_offset, "accuracy": round(self.acc, 4)}

    def state_dict(self) -> dict:
        return {"sampler": self.kind, "seed": self.tc.seed, "level": self.level, "acc": self.acc, "max_offset": self.max_offset}

    def load_state_dict(self, state: dict) -> None:
        self.level, self.acc = state["level"], state["acc"]
        self.max_offset = state.get("max_offset", 9)  # checkpoints from before copy_first


def make_source(cfg: dict, out: Path):
    if cfg["data"].get("task", "text") == "chains":
        return ChainsSource(cfg["data"], cfg["train"], out)
    return WindowSource(cfg["data"], cfg["train"])
