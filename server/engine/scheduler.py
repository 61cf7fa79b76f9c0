"""Continuous batching: which sequences run in the next step.

Each step is either a prefill of newly admitted sequences or one decode token for every running
sequence (nano-vllm's policy: prefill first, so new requests start as soon as memory allows).
Admission is first come, first served against the KV pool's byte budget and row limit; a sequence
that does not fit waits (and keeps later ones waiting, so a large request is not starved).
Requests join and leave between steps: a finished or aborted sequence frees its row at once.
"""

from __future__ import annotations

import time
from collections import deque

from .kv_pool import KVPool
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, pool: KVPool, max_num_batched_tokens: int):
        self.pool = pool
        self.max_num_batched_tokens = max_num_batched_tokens  # padded prompt tokens per prefill step
        self.waiting: deque[Sequence] = deque()

    @property
    def running(self) -> list[Sequence]:
        return self.pool.rows

    def has_work(self) -> bool:
        return bool(self.waiting or self.pool.rows)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[str, list[Sequence]] | None:
        """("prefill", new sequences deepest first) or ("decode", the running batch), or None when idle."""
        admitted: list[Sequence] = []
        longest = 0
        while self.waiting:
            seq = self.waiting[0]
            longest_next = max(longest, len(seq.prompt_ids))
            if admitted and (len(admitted) + 1) * longest_next > self.max_num_batched_tokens:
                break
            if not self.pool.fits(seq):
                break
            self.waiting.popleft()
            self.pool.insert(seq)
            seq.status, seq.admitted_at = Status.RUNNING, time.perf_counter()
            admitted.append(seq)
            longest = longest_next
        if admitted:
            admitted.sort(key=lambda s: -s.loops)  # the model cuts batches by depth prefix
            return "prefill", admitted
        if self.pool.rows:
            return "decode", list(self.pool.rows)  # a copy: finishing sequences leave the pool mid-loop
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence wherever it is: its row (or its place in the queue) is free after this call."""
        if seq.status is Status.RUNNING:
            self.pool.remove(seq, clear=reason == "error")  # a failed row may hold NaN/inf K/V
        elif seq.status is Status.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status, seq.finish_reason = Status.FINISHED, reason
