"""Shared test options and fixtures.

    pytest tests                       # everything but the soak tests (they are deselected, not skipped)
    pytest tests -m soak --run-soak    # only the long soak (`make soak`)

`serve` starts real `python -m server` (uvicorn) subprocesses on 127.0.0.1 and stops them at the end
of the test; each is a `benchmarks.harness.ServerProcess` (url, pid, metrics(), rss_mib(), log(),
terminate(), close()); a failed start fails the test with the server's log. `ckpt` is one tiny random
checkpoint for the whole session (benchmarks/tiny.py; a module may define its own), and `engine` a
module's engine on it.
"""

from __future__ import annotations

import pytest

from benchmarks.harness import ServerProcess, ServerStartError


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


@pytest.fixture
def serve(tmp_path_factory):
    """serve(args, env=None, code=None, ready=True) -> a started ServerProcess, killed after the test if still up."""
    started: list[ServerProcess] = []

    def start(args: list[str], env: dict | None = None, code: str | None = None, ready: bool = True) -> ServerProcess:
        log = tmp_path_factory.mktemp("server-log") / "server.log"
        proc = ServerProcess(args, log, env, code)
        started.append(proc)
        if ready:
            try:
                proc.wait_ready()
            except ServerStartError as e:  # the message carries the server's log
                pytest.fail(str(e), pytrace=False)
        return proc

    yield start
    for proc in started:
        proc.close()


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    from benchmarks.tiny import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def engine(ckpt):
    from server import Engine, EngineConfig

    engine = Engine(EngineConfig(model=ckpt, max_batch_size=16))
    yield engine
    engine.stop()
