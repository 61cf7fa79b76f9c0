"""The dashboard, the alerts and the deployment settings match what a real server exposes.

A tiny random checkpoint (tests/server_fixtures.py) is served in-process through the app's own
lifespan; a few requests (every depth, a stream, a 400 and a burst past the queue bound for 429s)
fill /metrics. Every metric name, label and legend used by deploy/grafana/dashboards/mesh.json and
deploy/prometheus/alerts.yml must exist in that output, and promtool lints it where installed. The
MESH_* settings in the compose file, the Dockerfiles and the ConfigMaps must be accepted by the
server's own argument parser.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server import __main__ as server_cli
from server.api.app import create_app
from server.engine import Engine, EngineConfig
from server_fixtures import build_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mesh.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMTOOL = shutil.which("promtool")
MAX_LOOPS = 4
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time, not by the server

_METRIC = re.compile(r"\b(mesh_[a-z0-9_]+)\b")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"\b([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


async def _exercise(app) -> str:
    """Real traffic through the app's lifespan (starts and stops the engine thread); returns /metrics."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            for loops in range(1, MAX_LOOPS + 1):
                r = await c.post("/v1/completions", json={"prompt": "All: speak", "max_tokens": 4, "loops": loops})
                assert r.status_code == 200, r.text
            async with c.stream("POST", "/v1/completions",
                                json={"prompt": "All:", "max_tokens": 4, "stream": True}) as r:
                assert r.status_code == 200
                assert [line async for line in r.aiter_lines() if line][-1] == "data: [DONE]"
            r = await c.post("/v1/completions", json={"prompt": "All:", "max_tokens": 4, "loops": MAX_LOOPS + 1})
            assert r.status_code == 400
            burst = await asyncio.gather(*[c.post("/v1/completions", json={"prompt": "All:", "max_tokens": 24})
                                           for _ in range(12)])
            assert {r.status_code for r in burst} == {200, 429}, "the burst should overflow max_waiting=2"
            r = await c.get("/metrics")
            assert r.status_code == 200
            return r.text


@pytest.fixture(scope="module")
def exposition(tmp_path_factory) -> str:
    ckpt = build_checkpoint(tmp_path_factory.mktemp("deploy") / "tiny", max_loops=MAX_LOOPS)
    engine = Engine(EngineConfig(model=ckpt, device="cpu", max_batch_size=2, max_waiting=2))
    return asyncio.run(_exercise(create_app(engine)))


@pytest.fixture(scope="module")
def samples(exposition) -> dict[str, list[dict]]:
    """sample name (e.g. mesh_x_bucket) -> the label sets it was exposed with."""
    out: dict[str, list[dict]] = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            out.setdefault(s.name, []).append(s.labels)
    return out


def _queries() -> list[tuple[str, str, str]]:
    """(where, PromQL, legendFormat) for every dashboard target and alert rule."""
    with open(DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"], t.get("legendFormat", ""))
           for p in dashboard["panels"] for t in p["targets"]]
    with open(ALERTS, encoding="utf-8") as f:
        out += [(f"alert {r['alert']}", r["expr"], "") for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
    return out


def test_every_metric_in_dashboard_and_alerts_is_exposed(samples):
    used = {name for _, expr, _ in _queries() for name in _METRIC.findall(expr)}
    assert len(used) >= 15
    missing = sorted(used - set(samples))
    assert not missing, f"used by the dashboard/alerts but not in /metrics: {missing}"


def test_labels_used_by_queries_and_legends_exist(samples):
    for where, expr, legend in _queries():
        names = _METRIC.findall(expr)
        if not names:
            continue  # up{job=...}: Prometheus' own series
        exposed = TARGET_LABELS | {label for n in names for labels in samples[n] for label in labels}
        wanted = {label.strip() for group in _BY.findall(expr) for label in group.split(",") if label.strip()}
        wanted |= set(_MATCHER.findall(expr)) | set(_LEGEND.findall(legend))
        assert wanted <= exposed, f"{where}: labels {sorted(wanted - exposed)} not on {sorted(set(names))}"


def test_label_values_have_the_shape_queries_assume(samples):
    # status=~"5.." / !~"2.." need 3-digit codes; the traffic above produced 200, 400 and 429.
    statuses = {labels["status"] for labels in samples["mesh_requests_total"]}
    assert {"200", "400", "429"} <= statuses and all(re.fullmatch(r"\d{3}", s) for s in statuses)
    # The depth panels: one generation counter per depth (and one for loops "auto"), one histogram bucket per depth.
    assert {labels["loops"] for labels in samples["mesh_generation_tokens_total"]} == {*(str(k) for k in range(1, MAX_LOOPS + 1)), "auto"}
    les = sorted(float(labels["le"]) for labels in samples["mesh_request_loops_bucket"])
    assert les[:MAX_LOOPS] == [float(k) for k in range(1, MAX_LOOPS + 1)]
    (info,) = samples["mesh_model_info"]
    assert info["max_loops"] == str(MAX_LOOPS) and info["layout"] == "1+1R2+1" and info["scheme"] == "mesh"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_lints_live_metrics(exposition):
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- settings


def _settings_sources() -> dict[str, dict[str, str]]:
    """Every place the deployment sets MESH_* variables: {where: {name: value}}."""
    with open(ROOT / "docker-compose.yml", encoding="utf-8") as f:
        compose = yaml.safe_load(f)
    out = {"docker-compose.yml": {k: str(v) for k, v in compose["services"]["server"]["environment"].items()}}
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / "deploy" / name).read_text(encoding="utf-8")
        out[name] = dict(re.findall(r"\b(MESH_\w+)=(\S+)", text))
    with open(ROOT / "deploy/k8s/configmap.yaml", encoding="utf-8") as f:
        out["deploy/k8s/configmap.yaml"] = base = yaml.safe_load(f)["data"]
    with open(ROOT / "deploy/k8s/gpu/configmap-gpu.yaml", encoding="utf-8") as f:
        # the GPU overlay patches the base ConfigMap (kustomize merges the data keys)
        out["deploy/k8s/gpu"] = {**base, **yaml.safe_load(f)["data"]}
    return out


def test_deployment_settings_are_accepted_by_the_server(monkeypatch):
    known = {server_cli.env_name(flag) for flag, *_ in server_cli.FLAGS}
    for where, env in _settings_sources().items():
        assert env, where
        assert set(env) <= known, f"{where}: {sorted(set(env) - known)} are not server settings"
        for name in known:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        args = server_cli.parse_args([])  # exits (SystemExit) on a value the server rejects
        assert args.host == "0.0.0.0" and args.port == 8000, where
