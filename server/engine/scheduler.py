"""Continuous batching with a token budget: which sequences run in the next step, and how many tokens.

Each step carries at most ``max_num_batched_tokens`` tokens: one for every decoding row, and prompt
chunks in the rest (vLLM's chunked prefill), so an arriving long prompt is spread over several steps
instead of stalling the running streams. Running sequences go first, oldest first; then waiting ones,
first come first served (a sequence that does not fit keeps later ones waiting, so a large request is
not starved).

Admission needs only the blocks the first chunk fills (plus a small watermark left free for running
rows), not prompt + max_tokens. When a running row needs a block and none is free, the most recently
admitted running sequence is preempted: its blocks are freed (full ones usually stay in the prefix
cache) and it goes back to the front of the queue, to be recomputed from its prompt and the tokens it
already produced (vLLM's recompute policy). Its stream just pauses: nothing is sent twice or lost.
"""

from __future__ import annotations

import time
from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int, on_preempt=None):
        self.blocks = blocks
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order (preemption takes from the end)
        self.on_preempt = on_preempt  # called with each preempted sequence (metrics)
        self.on_admit = None  # called with (sequence, prompt tokens looked up, tokens hit) on first admission
        self.failed: list[tuple[Sequence, Exception]] = []  # allocation faults of the last schedule(): to end
        self.preempted = False  # whether the last schedule() preempted
        self.plan = None  # called with each decoding sequence before a step: may start a speculation round

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute) for the next step; empty when idle or nothing fits. Decoding rows
        come first (a stream's next token never waits behind a prompt), then running prompt chunks,
        then new sequences."""
        budget = self.max_num_batched_tokens
        rows: list[tuple[Sequence, int]] = []
        taken: set[int] = set()  # ids of the sequences in this step
        decoding = [s for s in self.running if s.num_tokens - s.num_computed == 1]
        if self.plan is not None:
            for seq in decoding:
                self.plan(seq)
        self.preempted = False
        for seq in decoding + [s for s in self.running if s.num_tokens - s.num_computed > 1]:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            alloc, cost = self._work(seq, budget)
            if cost <= budget and self._fit(seq, alloc, taken):
                rows.append((seq, cost))
                taken.add(seq.id)
                budget -= cost
        if not self.preempted:  # memory is short: admitting now would only preempt again
            self._admit(rows, budget)
        return rows

    @staticmethod
    def _work(seq: Sequence, budget: int) -> tuple[int, int]:
        """(tokens past num_computed to hold blocks for, tokens this step computes) for a running sequence:
        a prompt chunk, one decode token, one draft token after the drafts so far, or a verify pass over
        the round's drafts."""
        if seq.spec_tokens:
            if seq.verifying:
                return seq.spec_tokens, seq.spec_tokens
            return len(seq.draft_ids) + 1, 1
        left = seq.num_tokens - seq.num_computed
        if seq.auto is not None and 1 < left <= budget:
            left -= 1  # "auto": the last prompt token runs as a decode step, so the first token may stop early too
        n = min(left, budget)
        return n, n

    def _fit(self, seq: Sequence, n: int, taken: set[int]) -> bool:
        """Allocates n more tokens for a running sequence, preempting the newest sequences not yet in this
        step while memory is short. False when `seq` itself was preempted, or failed (an allocation fault
        ends only that sequence; the pool is left as it was)."""
        while True:
            try:
                if self.blocks.allocate(seq, n):
                    return True
            except Exception as e:
                self._failed(seq, e)
                return False
            victim = next(s for s in reversed(self.running) if s.id not in taken)  # the newest: least to redo
            self._preempt(victim)
            self.preempted = True
            if victim is seq:
                return False

    def _admit(self, rows: list, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.leader is not None and seq.leader.status is Status.RUNNING and \
                    seq.leader.num_computed < len(seq.leader.prompt_ids):
                break  # n > 1: wait for choice 0's prompt blocks, then share them
            first_time = seq.admitted_at == 0.0
            try:
                hit = self.blocks.match_prefix(seq)
            except Exception as e:
                self.blocks.free(seq)
                self._failed(seq, e)
                continue
            n = self._work(seq, budget)[1]
            try:
                fits = self.blocks.allocate(seq, n, reserve=self.blocks.watermark)
            except Exception as e:
                self._failed(seq, e)
                continue
            if not fits:
                self.blocks.free(seq)  # gives back the shared prefix
                break
            self.waiting.popleft()
            if first_time:
                seq.admitted_at = time.perf_counter()
                if self.on_admit is not None:
                    self.on_admit(seq, seq.num_tokens, hit)
            seq.status = Status.RUNNING
            self.running.append(seq)
            rows.append((seq, n))
            budget -= n

    def _failed(self, seq: Sequence, e: Exception) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq, discard=True)
        seq.status, seq.finish_reason = Status.FINISHED, "error"
        self.failed.append((seq, e))

    def take_failed(self) -> list[tuple[Sequence, Exception]]:
        failed, self.failed = self.failed, []
        return failed

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.end_round()  # its drafts are dropped: recomputing restarts from the verified tokens
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        if self.on_preempt is not None:
            self.on_preempt(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence wherever it is: its blocks (or its place in the queue) are free after this call."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq, discard=reason == "error")
        elif seq.status is Status.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status, seq.finish_reason = Status.FINISHED, reason
