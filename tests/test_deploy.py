"""Deployment files stay consistent with each other and with the repository (no Docker engine needed).

Parses docker-compose.yml, the Dockerfiles, .dockerignore, the Prometheus and Grafana provisioning,
the dashboard and the Kubernetes manifests, and checks that the names, ports and paths they use
point at each other. Where Debian's `promtool` is installed (.ci/run installs it) the Prometheus
config, the alert rules (with their unit tests in alerts_test.yml) and every dashboard query are
also checked by Prometheus' own parser. The live /metrics side is in test_deploy_metrics.py.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
PROM_DIR = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mesh.json"
K8S = DEPLOY / "k8s"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")

# The server's metric names (issue 4 fixes them; dashboards and alerts rely on them).
SERVER_METRICS = {
    "mesh_requests_total", "mesh_prompt_tokens_total", "mesh_generation_tokens_total",
    "mesh_time_to_first_token_seconds", "mesh_inter_token_latency_seconds",
    "mesh_e2e_request_latency_seconds", "mesh_request_queue_time_seconds", "mesh_request_loops",
    "mesh_requests_running", "mesh_requests_waiting", "mesh_kv_cache_usage_ratio",
    "mesh_max_waiting", "mesh_model_info",
    # issue 11: the paged K/V pool
    "mesh_num_preemptions_total", "mesh_prefix_cache_queries_total", "mesh_prefix_cache_hits_total",
    # issue 13: self-speculation and adaptive depth
    "mesh_spec_decode_num_draft_tokens_total", "mesh_spec_decode_num_accepted_tokens_total", "mesh_token_loops",
}
_METRIC = re.compile(r"\b(mesh_[a-z0-9_]+)\b")


def _load_render_module():
    spec = importlib.util.spec_from_file_location("render_dashboard", ROOT / "scripts" / "render_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _compose() -> dict:
    return _yaml(COMPOSE)


def _dashboard() -> dict:
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def _alert_rules() -> list[dict]:
    return [r for g in _yaml(PROM_DIR / "alerts.yml")["groups"] for r in g["rules"]]


def _family(sample_name: str) -> str:
    """mesh_x_seconds_bucket -> mesh_x_seconds (histogram/summary series belong to their family)."""
    for suffix in ("_bucket", "_sum", "_count"):
        if sample_name.endswith(suffix):
            return sample_name[: -len(suffix)]
    return sample_name


# --------------------------------------------------------------------------- every file parses


def _deploy_files(*suffixes):
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in suffixes)


def test_every_yaml_and_json_file_parses():
    yaml_files = [COMPOSE] + _deploy_files(".yml", ".yaml")
    json_files = _deploy_files(".json")
    assert len(yaml_files) >= 15 and json_files, "deploy/ lost files"
    for path in yaml_files:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f)]
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"
    for path in json_files:
        with open(path, encoding="utf-8") as f:
            assert isinstance(json.load(f), dict), path


# --------------------------------------------------------------------------- docker compose


def test_compose_services_ports_and_build():
    services = _compose()["services"]
    assert set(services) == {"server", "prometheus", "grafana"}
    server = services["server"]
    assert (ROOT / server["build"]["context"]).resolve() == ROOT
    assert (ROOT / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    assert "8000:8000" in server["ports"]
    assert server["environment"]["MESH_HOST"] == "0.0.0.0", "the server must listen outside the container"
    health = " ".join(server["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/health" in health
    assert "9090:9090" in services["prometheus"]["ports"] and "3000:3000" in services["grafana"]["ports"]
    # Pinned third-party images: an explicit version tag, never latest.
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name} image not pinned: {image}"
    assert services["prometheus"]["depends_on"]["server"]["condition"] == "service_healthy"


def _bind_mounts(service: dict) -> dict[str, Path]:
    """container path -> host path for the service's bind mounts (./ sources)."""
    mounts = {}
    for spec in service.get("volumes", []):
        src, dst = spec.split(":")[:2]
        if src.startswith("./"):
            mounts[dst] = ROOT / src
    return mounts


def _in_container(mounts: dict[str, Path], container_path: str) -> Path:
    """Where a path inside the container lives in the repo, through the bind mounts."""
    for dst, src in mounts.items():
        if container_path == dst or container_path.startswith(dst.rstrip("/") + "/"):
            return src / container_path[len(dst):].lstrip("/")
    raise AssertionError(f"{container_path} is not under any bind mount ({sorted(mounts)})")


def test_compose_mounted_paths_exist_and_wire_up():
    services = _compose()["services"]
    for name, service in services.items():
        for dst, src in _bind_mounts(service).items():
            assert src.exists(), f"{name}: mounted {src} is missing"

    # Prometheus reads its config from the mount and scrapes the server service on its port.
    prom = services["prometheus"]
    prom_mounts = _bind_mounts(prom)
    flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = _in_container(prom_mounts, flag.split("=", 1)[1])
    assert config_path.resolve() == (PROM_DIR / "prometheus.yml").resolve()
    config = _yaml(config_path)
    for rule_file in config["rule_files"]:
        assert (config_path.parent / rule_file).is_file()
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    server_port = services["server"]["environment"]["MESH_PORT"]
    assert targets == [f"server:{server_port}"]
    assert config["global"]["scrape_interval"] == "5s"

    # Grafana: provisioning is mounted where Grafana looks, the datasource points at the
    # prometheus service, the dashboard provider at the mounted dashboards, the home page exists.
    graf = services["grafana"]
    graf_mounts = _bind_mounts(graf)
    prov = _in_container(graf_mounts, "/etc/grafana/provisioning")
    (datasource,) = _yaml(prov / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    assert datasource["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
    (provider,) = _yaml(prov / "dashboards" / "mesh.yml")["providers"]
    dash_dir = _in_container(graf_mounts, provider["options"]["path"])
    assert (dash_dir / "mesh.json").resolve() == DASHBOARD.resolve()
    home = _in_container(graf_mounts, graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.resolve() == DASHBOARD.resolve()
    assert graf["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true", "no-click dashboard needs anonymous view"


# --------------------------------------------------------------------------- Dockerfiles


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, `!` re-includes; a pattern
    that matches a parent folder matches everything under it."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


def _pyproject_torch_pin() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return re.search(r'"torch==([\d.]+)"', text).group(1)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_copies_exist_runs_non_root_and_pins_torch(name):
    instructions = _instructions(DEPLOY / name)
    copies = [args.split() for word, args in instructions if word == "COPY" and "--from" not in args]
    assert copies
    for args in copies:
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"{name}: COPY {src} is not in the repo"
            assert not _dockerignored(src), f"{name}: COPY {src} is excluded by .dockerignore"
    # Each copied folder's Python files reach the build context (not just the folder name).
    for pkg in ("model", "server"):
        assert not _dockerignored(f"{pkg}/__init__.py")
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final image must not run as root"
    assert ("EXPOSE", "8000") in instructions
    cmd = [args for word, args in instructions if word == "CMD"][-1]
    assert json.loads(cmd) == ["python", "-m", "server"]
    assert any("MESH_HOST=0.0.0.0" in args for word, args in instructions if word == "ENV")
    torch_installs = [args for word, args in instructions if word == "RUN" and "torch==" in args]
    assert torch_installs and all(f"torch=={_pyproject_torch_pin()}" in a for a in torch_installs)
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) == 2, "build stage + slim runtime stage"
    args = dict(a.split("=", 1) for word, a in instructions if word == "ARG" and "=" in a)
    if name == "Dockerfile":
        assert "--index-url https://download.pytorch.org/whl/cpu" in torch_installs[0]
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", args["PYTHON_IMAGE"])
    else:
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
        assert any("MESH_DEVICE=cuda" in a for word, a in instructions if word == "ENV")


def test_dockerignore_keeps_the_context_lean():
    for heavy in (".git", ".venv", "tests", "runs", "docs", "training", "model/__pycache__/x.pyc"):
        assert _dockerignored(heavy), f"{heavy} would be sent to the Docker build"
    for needed in ("pyproject.toml", "README.md", "model/modeling.py", "server/__main__.py"):
        assert not _dockerignored(needed)


# --------------------------------------------------------------------------- Kubernetes


def _k8s_docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _kustomize(folder: Path) -> dict[tuple[str, str], dict]:
    """(kind, name) -> object: the resources of a kustomization with its strategic-merge patches
    applied (maps merge, lists of named items merge by name, other lists are replaced) --
    the subset of `kubectl apply -k` these manifests use."""
    kustomization = _yaml(folder / "kustomization.yaml")
    objects: dict[tuple[str, str], dict] = {}
    for res in kustomization["resources"]:
        path = (folder / res).resolve()
        assert path.exists(), f"{folder}: resource {res} is missing"
        if path.is_dir():
            objects.update(_kustomize(path))
        else:
            for doc in _k8s_docs(path):
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    for patch in kustomization.get("patches", []):
        (doc,) = _k8s_docs(folder / patch["path"])
        key = (doc["kind"], doc["metadata"]["name"])
        assert key in objects, f"patch {patch['path']} targets no resource"
        objects[key] = _merge(objects[key], doc)
    return objects


def _merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in base + patch):
        by_name = {x["name"]: x for x in base}
        for x in patch:
            by_name[x["name"]] = _merge(by_name[x["name"]], x) if x["name"] in by_name else x
        return list(by_name.values())
    return patch


def _check_server_stack(objects: dict, *, gpu: bool) -> dict:
    kinds = {kind for kind, _ in objects}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler"} <= kinds
    (dep,) = [o for (k, _), o in objects.items() if k == "Deployment"]
    (svc,) = [o for (k, _), o in objects.items() if k == "Service"]
    (hpa,) = [o for (k, _), o in objects.items() if k == "HorizontalPodAutoscaler"]
    (cm,) = [o for (k, _), o in objects.items() if k == "ConfigMap"]

    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}

    # Resources: requests and limits for CPU and memory (and one GPU in the GPU variant).
    res = container["resources"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[section]), f"resources.{section}"
    assert ("nvidia.com/gpu" in res["limits"]) == gpu
    if gpu:
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 1
        assert container["image"].endswith("-cuda")
        assert cm["data"]["MESH_DEVICE"] == "cuda"
    else:
        assert cm["data"]["MESH_DEVICE"] == "cpu"

    # Probes on /health through the named port; startup probe covers the model load.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and ports[get["port"]] == 8000, probe

    # Graceful termination: the preStop pause fits well inside the grace period.
    (sleep_s,) = [int(a) for a in container["lifecycle"]["preStop"]["exec"]["command"][1:]]
    assert pod["spec"]["terminationGracePeriodSeconds"] >= sleep_s + 30
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    # Settings come from the ConfigMap, all MESH_* strings.
    assert container["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]
    assert cm["data"] and all(k.startswith("MESH_") and isinstance(v, str) for k, v in cm["data"].items())
    assert cm["data"]["MESH_HOST"] == "0.0.0.0" and cm["data"]["MESH_PORT"] == "8000"

    # Scrape annotations point at the metrics port and path.
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == 8000
    assert ann["prometheus.io/path"] == "/metrics"

    # The Service selects these pods and forwards to the named container port.
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] in ports

    # The HPA scales this Deployment, on the server's own queue metric (and CPU).
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pod_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pod_metrics == ["mesh_requests_waiting"]
    return {"deployment": dep, "service": svc}


def test_k8s_cpu_stack_has_required_fields():
    objects = _kustomize(K8S)
    listed = {(K8S / r).resolve() for r in _yaml(K8S / "kustomization.yaml")["resources"]}
    on_disk = {p.resolve() for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == on_disk, "every manifest in deploy/k8s is part of the kustomization"
    _check_server_stack(objects, gpu=False)


def test_k8s_gpu_variant_requests_a_gpu():
    _check_server_stack(_kustomize(K8S / "gpu"), gpu=True)


def test_servicemonitor_matches_the_service():
    stack = _check_server_stack(_kustomize(K8S), gpu=False)
    (sm,) = _k8s_docs(K8S / "monitoring" / "servicemonitor.yaml")
    assert sm["kind"] == "ServiceMonitor"
    svc = stack["service"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]} and endpoint["path"] == "/metrics"


# --------------------------------------------------------------------------- dashboard and alerts


def test_dashboard_structure():
    dash = _dashboard()
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    (datasource,) = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & cell, f"panel {p['title']!r} overlaps another"
        cells |= cell
        assert p["datasource"]["uid"] == datasource["uid"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"]["uid"] == datasource["uid"] and t["expr"].strip()
            # Counters and histograms are only ever read through rate()/increase().
            for name in _METRIC.findall(t["expr"]):
                if name.endswith(("_total", "_bucket", "_sum", "_count")):
                    assert re.search(rf"(rate|increase)\(\s*{name}\b", t["expr"]), t["expr"]


def test_dashboard_has_the_panels_operators_expect():
    by_title = {p["title"]: p for p in _dashboard()["panels"]}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in by_title.items()}
    legends = {title: [t["legendFormat"] for t in p["targets"]] for title, p in by_title.items()}

    assert "sum by (status)" in exprs["Request rate by status"] and "mesh_requests_total" in exprs["Request rate by status"]
    assert 'status!~"2.."' in exprs["Errors by code"]
    for title, metric in (("Time to first token", "mesh_time_to_first_token_seconds"),
                          ("Inter-token latency", "mesh_inter_token_latency_seconds"),
                          ("End-to-end request latency", "mesh_e2e_request_latency_seconds")):
        for q in ("0.5", "0.9", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket" in exprs[title]
        assert legends[title][:3] == ["p50", "p90", "p99"]
    assert "rate(mesh_generation_tokens_total" in exprs["Generation tokens/s"]
    assert {"mesh_requests_running", "mesh_requests_waiting", "mesh_max_waiting"} <= set(_METRIC.findall(exprs["Running vs waiting requests"]))
    assert "mesh_kv_cache_usage_ratio" in exprs["KV-cache usage"]
    assert by_title["KV-cache usage"]["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert "sum by (loops) (rate(mesh_generation_tokens_total" in exprs["Generation throughput by depth"]
    depth = by_title["Requested depth (loops) distribution"]["targets"][0]
    assert depth["format"] == "heatmap" and "increase(mesh_request_loops_bucket" in depth["expr"]
    assert "rate(mesh_num_preemptions_total" in exprs["Preemptions/s"]
    hits = exprs["Prefix-cache hit rate"]
    assert re.search(r"rate\(mesh_prefix_cache_hits_total.*\)\s*/\s*sum by \(instance\) \(rate\(mesh_prefix_cache_queries_total", hits, re.S), hits
    assert by_title["Prefix-cache hit rate"]["fieldConfig"]["defaults"]["unit"] == "percentunit"
    acc = exprs["Speculation acceptance rate"]
    assert re.search(r"rate\(mesh_spec_decode_num_accepted_tokens_total.*\)\s*/\s*sum by \(instance\) \(rate\(mesh_spec_decode_num_draft_tokens_total", acc, re.S), acc
    mean = exprs["Mean core iterations per generated token"]
    assert re.search(r"rate\(mesh_token_loops_sum.*\)\s*/\s*sum by \(instance\) \(rate\(mesh_token_loops_count", mean, re.S), mean


def test_dashboard_and_alerts_use_only_server_metrics_and_cover_them():
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]
    exprs += [r["expr"] for r in _alert_rules()]
    families = {_family(n) for e in exprs for n in _METRIC.findall(e)}
    assert families == SERVER_METRICS, f"unknown: {families - SERVER_METRICS}, unused: {SERVER_METRICS - families}"


def test_alert_rules_cover_the_failure_modes():
    rules = {r["alert"]: r for r in _alert_rules()}
    assert set(rules) == {"MeshServerDown", "MeshHighErrorRate", "MeshHighTimeToFirstToken",
                          "MeshQueueSaturated", "MeshSustainedPreemption", "MeshKVCacheExhausted"}
    assert 'up{job="mesh-server"} == 0' in rules["MeshServerDown"]["expr"]
    job_names = [j["job_name"] for j in _yaml(PROM_DIR / "prometheus.yml")["scrape_configs"]]
    assert job_names == ["mesh-server"], "MeshServerDown matches on this job name"
    assert 'status=~"5.."' in rules["MeshHighErrorRate"]["expr"]
    assert "histogram_quantile(0.99" in rules["MeshHighTimeToFirstToken"]["expr"]
    assert "mesh_requests_waiting / (mesh_max_waiting > 0)" in rules["MeshQueueSaturated"]["expr"]
    assert "rate(mesh_num_preemptions_total[5m])" in rules["MeshSustainedPreemption"]["expr"]
    # A full block pool is normal under paging: the KV alert needs requests waiting as well.
    kv = rules["MeshKVCacheExhausted"]["expr"]
    assert "mesh_kv_cache_usage_ratio >" in kv and "and on (job, instance) mesh_requests_waiting > 0" in kv
    for r in rules.values():
        assert r["labels"]["severity"] in {"warning", "critical"} and r["annotations"]["summary"]
        assert re.fullmatch(r"\d+m", r["for"])


def test_render_script_expands_every_dashboard_variable():
    render = _load_render_module()
    dash = _dashboard()
    queries = render.panel_queries(dash, rate_interval="20s", range_="15m")
    assert len(queries) == sum(len(p["targets"]) for p in dash["panels"])
    for _, _, expr in queries:
        assert "$" not in expr, expr
    assert any("[20s]" in e for _, _, e in queries) and any("[15m]" in e for _, _, e in queries)
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        render.expand("rate(x[$__interval_typo])", dash, rate_interval="20s", range_="1m")


# --------------------------------------------------------------------------- promtool


def _promtool(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_accepts_config_and_rules():
    proc = _promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _promtool("check", "rules", str(PROM_DIR / "alerts.yml"))
    assert proc.returncode == 0 and f"SUCCESS: {len(_alert_rules())} rules found" in proc.stdout, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_alert_unit_tests_pass():
    """alerts_test.yml: each alert fires on the synthetic series meant to trip it, not on the rest."""
    proc = _promtool("test", "rules", str(PROM_DIR / "alerts_test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each panel query (variables expanded as Grafana would) is valid PromQL: wrap them as
    recording rules and let promtool parse them."""
    render = _load_render_module()
    rules = [{"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": expr}
             for p, t, expr in render.panel_queries(_dashboard())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    proc = _promtool("check", "rules", str(path))
    assert proc.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in proc.stdout, proc.stdout + proc.stderr
