"""Shared test options and fixtures.

    pytest tests                       # everything but the soak tests (they are deselected, not skipped)
    pytest tests -m soak --run-soak    # only the long soak (`make soak`)

`serve` starts real `python -m server` (uvicorn) subprocesses on 127.0.0.1 and stops them at the end
of the test; each is a `ServerProcess` (url, pid, metrics(), rss_mib(), log()). `ckpt` is one tiny
random checkpoint for the whole session (tests/server_fixtures.py; a module may define its own), and
`engine` a module's engine on it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--run-soak", action="store_true", default=False,
                     help="run the long soak tests (marked `soak`; bounded, loopback only): make soak")


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: long load/soak tests, run only with --run-soak (make soak)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-soak"):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:  # deselected (reported as such), so a plain run neither runs nor "skips" them
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `python -m server` subprocess (or `python -c CODE` that ends in the same CLI) and its log."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, code: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w+")
        entry = ["-c", code] if code is not None else ["-m", "server"]
        self.proc = subprocess.Popen(
            [sys.executable, *entry, *args, "--port", str(self.port), "--threads", "1"],
            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the server did not start (exit {self.proc.poll()}):\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics(self, headers: dict | None = None) -> dict:
        """{(name, sorted label items): value} from /metrics."""
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def rss_mib(self) -> float:
        """Resident memory of the server process now (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture
def serve(tmp_path_factory):
    """serve(args, env=None, code=None, ready=True) -> a started ServerProcess, killed after the test if still up."""
    started: list[ServerProcess] = []

    def start(args: list[str], env: dict | None = None, code: str | None = None, ready: bool = True) -> ServerProcess:
        log = tmp_path_factory.mktemp("server-log") / "server.log"
        proc = ServerProcess(args, log, env, code)
        started.append(proc)
        return proc.wait_ready() if ready else proc

    yield start
    for proc in started:
        proc.close()


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    from server_fixtures import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def engine(ckpt):
    from server import Engine, EngineConfig

    engine = Engine(EngineConfig(model=ckpt, max_batch_size=16))
    yield engine
    engine.stop()
