"""The serving side of the engine: a thread that steps it, and delivery of outputs to asyncio.

    frontend = engine.frontend            # one per Engine (engine.start / submit / stop delegate here)
    frontend.start()
    handle = frontend.submit([ids], params, loops=2)   # inside a running event loop
    async for out in handle: ...                        # handle.abort() frees its blocks at the next step

The engine core knows nothing of asyncio: each sequence carries a `sink` (its RequestHandle), and after
every step this thread hands each event loop its outputs with one thread-safe call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import torch

from .sequence import Status, StepOutput

log = logging.getLogger("server.engine")


class RequestHandle:
    """One HTTP request's sequences and the asyncio queue their outputs arrive on (in the event loop's thread)."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop):
        self.engine, self.loop = engine, loop
        self.queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.seqs: list = []
        self.unfinished = 0
        self.aborted = False
        self.deadline: float | None = None  # time.monotonic() past which iterating raises TimeoutError

    def abort(self) -> None:
        """Frees this request's blocks at the next step boundary (client gone, error elsewhere)."""
        if not self.aborted and self.unfinished:
            self.aborted = True
            self.engine.abort(self.seqs)

    def __aiter__(self):
        return self

    async def __anext__(self) -> StepOutput:
        if self.unfinished == 0:
            raise StopAsyncIteration
        # The per-request timeout (--request-timeout): past the deadline this raises asyncio.TimeoutError,
        # and the caller aborts the request.
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise asyncio.TimeoutError
        if not self.queue.empty():
            out = self.queue.get_nowait()
        elif self.deadline is None:
            out = await self.queue.get()
        else:
            out = await asyncio.wait_for(self.queue.get(), self.deadline - time.monotonic())
        if out.finished:
            self.unfinished -= 1
        return out


class AsyncEngine:
    def __init__(self, engine):
        self.engine = engine
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None  # why the engine thread died, if it did

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def wake(self) -> None:
        self._wake.set()

    def submit(self, prompts, params, loops=None, n: int = 1, request_id: str | None = None) -> RequestHandle:
        """add_request for the asyncio side: outputs arrive on the handle's queue. Call inside the event loop."""
        handle = RequestHandle(self.engine, asyncio.get_running_loop())
        handle.seqs = self.engine.add_request(prompts, params, loops, n, request_id, sink=handle)
        handle.unfinished = len(handle.seqs)
        return handle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="mesh-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the thread; sequences still queued or running end with finish_reason "abort"."""
        with self.engine._lock:
            self._stopping = True
            self.engine.closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                if not engine.has_work():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._deliver(engine.step())
            self._deliver(self._abort_all())
        except BaseException as e:  # the loop itself broke: report, fail everyone, let /health say 503
            with engine._lock:  # add_request checks `closed` under the lock: nothing joins after the sweep below
                self.error = e
                engine.closed = True
            log.exception("engine thread died")
            self._deliver(self._abort_all(reason="error", error=f"engine stopped: {type(e).__name__}: {e}"))

    @torch.inference_mode()
    def _abort_all(self, reason: str = "abort", error: str | None = None) -> list[StepOutput]:
        """Ends every queued and running sequence. Each gets its last output even when the bookkeeping
        fails, since this also runs after the loop itself broke (a request must never wait forever)."""
        outputs = []
        for seq in self.engine.all_sequences():
            if seq.status is Status.FINISHED:
                continue
            try:
                self.engine._finish(seq, reason)
            except Exception:
                log.exception("could not free sequence %s cleanly", seq)
                seq.status, seq.finish_reason = Status.FINISHED, reason
            outputs.append(StepOutput(seq, [], "", None, reason, error=error))
        return outputs

    @staticmethod
    def _deliver(outputs: list[StepOutput]) -> None:
        """Hands outputs to their requests' event loops: one thread-safe call per loop per step."""
        by_loop: dict = {}
        for out in outputs:
            if out.seq.sink is not None:
                by_loop.setdefault(out.seq.sink.loop, []).append(out)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
                pass


def _put_all(items: list[StepOutput]) -> None:
    for out in items:
        out.seq.sink.queue.put_nowait(out)
