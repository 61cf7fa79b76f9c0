"""One `python -m server` subprocess on a free loopback port, for tests, benchmarks and scripts alike.

    with ServerProcess(["--model", DIR], log_path) as server:    # started, /health answered 200
        server.url, server.pid, server.metrics(), server.rss_mib()
    # left: SIGTERM, then SIGKILL if it has not exited within `grace` seconds

`code` runs `python -c CODE ARGS...` instead of `-m server`: a wrapper that patches something (a slow
step, an injected fault) and then calls the same CLI. A server that exits or does not answer /health in
time raises `ServerStartError` with its log, so a failed start says why.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


class ServerStartError(RuntimeError):
    """The server exited or did not answer /health in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one when pid is None), all threads (Linux /proc)."""
    if pid is None:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_mib(pid: int) -> float:
    """Resident memory of a process now (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET url answers 200; False on any other status or no answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):  # refused, reset, timeout, or an HTTP error status
        return False


class ServerProcess:
    """`python -m server ARGS --port P --threads T` (or `python -c CODE ARGS ...`) run in `cwd` (another
    checkout's server, e.g. a baseline worktree), its log in `log_path`.
    Starting it does not wait: `wait_ready()` (or `with`) does."""

    def __init__(self, args: list[str], log_path: str | Path, env: dict | None = None, code: str | None = None,
                 threads: int = 1, cwd: str | Path = ROOT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        entry = ["-c", code] if code is not None else ["-m", "server"]
        # --threads and OMP_NUM_THREADS alike (0: torch's default): tiny models gain nothing from more
        # threads, and the cores are shared with the client.
        self.cmd = [sys.executable, *entry, *args, "--port", str(self.port), "--threads", str(threads)]
        pinned = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
        self._log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **pinned, **(env or {})})
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 180.0) -> "ServerProcess":
        """Polls /health until it answers 200; raises ServerStartError (with the log) otherwise."""
        deadline = time.monotonic() + timeout
        while not http_ok(self.url + "/health", timeout=2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with status {self.proc.returncode}" if self.proc.poll() is not None
                       else f"did not answer /health within {timeout:.0f} s")
                log = self.log()
                self.close()
                raise ServerStartError(f"the server {why}; its log:\n{log}")
            time.sleep(0.1)
        return self

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics(self, headers: dict | None = None) -> dict:
        """{(name, sorted label items): value} from /metrics."""
        req = urllib.request.Request(self.url + "/metrics", headers=headers or {})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def rss_mib(self) -> float:
        return rss_mib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (the server drains), then waits; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self, grace: float = 10.0) -> None:
        """Stops the server whatever state it is in: SIGTERM, then SIGKILL after `grace` seconds."""
        if self.proc.poll() is None:
            try:
                self.terminate(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.close()
