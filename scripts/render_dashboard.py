"""Render the Grafana dashboard from real data, without Grafana.

    python scripts/render_dashboard.py                       # default model, ~4 min of load
    python scripts/render_dashboard.py --model DIR --duration 120 --out /tmp/dash.png

Grafana cannot be installed here, so this does what Grafana does for each panel: start a MeSH
server on loopback, start Debian's Prometheus (the `prometheus` package) with the repository's own
deploy/prometheus/prometheus.yml and alerts.yml (only the scrape target changed), put the server
under a load that ramps up past its queue bound, expand the dashboard's variables in every panel
query, ask Prometheus through its HTTP API, and plot the answers with matplotlib in the
dashboard's own grid. The result is docs/dashboard.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchmarks.harness import ServerProcess, free_port, http_ok
from benchmarks.loadgen import closed_loop
from model import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mesh.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")

PROMPTS = [
    "ROMEO:", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nBefore we proceed any further, hear me speak.",
    "KING RICHARD III:\nNow is the winter of our discontent", "HAMLET:\nTo be, or not to be:",
    "MENENIUS:\nI tell you, friends, most charitable care", "LADY MACBETH:\nOut, damned spot!",
]


# --------------------------------------------------------------------------- dashboard queries


def load_dashboard(path: Path = DASHBOARD) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def expand(expr: str, dashboard: dict, *, rate_interval: str, range_: str) -> str:
    """Substitute Grafana's variables the way Grafana would with "All" selected.

    $__rate_interval is Grafana's max($__interval + scrape interval, 4 x scrape interval); the caller
    passes it. An unknown variable raises, so a typo in the dashboard cannot slip through.
    """
    values = {"__rate_interval": rate_interval, "__range": range_, "__interval": rate_interval}
    for var in dashboard.get("templating", {}).get("list", []):
        if not var.get("includeAll"):
            raise ValueError(f"variable ${var['name']} has no 'All' option to render with")
        values[var["name"]] = var.get("allValue") or ".*"

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(sub, expr)


def panel_queries(dashboard: dict, *, rate_interval: str = "20s", range_: str = "10m"):
    """(panel, target, expanded PromQL) for every query of every panel, in dashboard order."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel, target, expand(target["expr"], dashboard, rate_interval=rate_interval, range_=range_)))
    return out


def legend(fmt: str, labels: dict) -> str:
    """Grafana's legendFormat: {{label}} -> the series' label value."""
    return _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt) if fmt else json.dumps(labels)


# --------------------------------------------------------------------------- processes


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not http_ok(url):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout:.0f}s; see {log}")
        time.sleep(0.5)


@contextmanager
def process(args: list[str], log: Path):
    """Prometheus (the server runs through benchmarks.harness): SIGTERM on the way out, then SIGKILL."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def prometheus_config(target: str, workdir: Path) -> Path:
    """deploy/prometheus/prometheus.yml with the scrape target swapped for the local server."""
    import yaml

    with open(PROMETHEUS_YML, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    config["rule_files"] = [str(PROMETHEUS_YML.parent / r) for r in config["rule_files"]]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- load


class Load:
    """Closed-loop clients (benchmarks.loadgen) whose number follows a ramp: quiet, busy, past the queue
    bound, quiet.

    Requests mix depths (more shallow than deep), lengths, streaming and a few invalid ones (a depth
    past max_loops -> 400), so every panel, the error one included, has something to show.
    """

    def __init__(self, base_url: str, model_id: str, max_loops: int, duration: float, peak: int, seed: int = 0):
        self.base_url, self.model_id, self.max_loops = base_url, model_id, max_loops
        self.duration, self.peak = duration, peak
        self.rng = random.Random(seed)

    def clients_at(self, t: float) -> int:
        """How many clients are active at second t of the run."""
        x = t / self.duration
        if x < 0.2:
            return 1
        if x < 0.45:
            return max(2, self.peak // 4)
        if x < 0.8:
            return self.peak
        return 2

    def request(self) -> dict:
        r = self.rng
        weights = [1.0 / k for k in range(1, self.max_loops + 1)]
        loops = r.choices(range(1, self.max_loops + 1), weights)[0]
        if r.random() < 0.03:
            loops = self.max_loops + 1  # invalid on purpose: the server must answer 400
        return {"model": self.model_id, "prompt": r.choice(PROMPTS), "max_tokens": r.randint(8, 48),
                "temperature": 0.8, "loops": loops, "stream": r.random() < 0.5, "seed": r.randrange(1 << 30)}

    async def _run(self) -> list[dict]:
        from tqdm import tqdm

        async def ticker():
            for _ in tqdm(range(int(self.duration)), desc="load", unit="s"):
                await asyncio.sleep(1)

        tick = asyncio.ensure_future(ticker())
        results = await closed_loop(self.base_url, self.request, self.clients_at, self.duration, self.peak)
        tick.cancel()
        return results

    def run(self) -> dict[int, int]:
        """Runs the ramp; returns {HTTP status (0 = no answer): requests}."""
        counts: dict[int, int] = {}
        for res in asyncio.run(self._run()):
            counts[res["status"]] = counts.get(res["status"], 0) + 1
        return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- Prometheus HTTP API


class Prometheus:
    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=30)

    def _get(self, path: str, **params) -> dict:
        body = self.http.get(path, params=params).json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: {body.get('error')}")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def query(self, expr: str, at: float) -> list[dict]:
        return self._get("/api/v1/query", query=expr, time=at)["result"]

    def alerts(self) -> list[dict]:
        return self._get("/api/v1/alerts")["alerts"]

    def version(self) -> str:
        return self._get("/api/v1/status/buildinfo")["version"]

    def target_health(self) -> list[str]:
        return [t["health"] for t in self._get("/api/v1/targets")["activeTargets"]]


def evaluate(prom: Prometheus, dashboard: dict, start: float, end: float, step: float, rate_interval: str) -> dict:
    """Every panel query, evaluated as Grafana would: range queries over the run, instant ones at its end
    with $__range = the run's length. {panel id: [(target, [series])]}"""
    range_ = f"{int(math.ceil(end - start))}s"
    out: dict[int, list] = {}
    for panel, target, expr in panel_queries(dashboard, rate_interval=rate_interval, range_=range_):
        if target.get("instant") and not target.get("range"):
            result = prom.query(expr, end)
            series = [(legend(target.get("legendFormat", ""), r["metric"]), [end], [float(r["value"][1])]) for r in result]
        else:
            result = prom.query_range(expr, start, end, step)
            series = [(legend(target.get("legendFormat", ""), r["metric"]),
                       [float(t) for t, _ in r["values"]], [float(v) for _, v in r["values"]]) for r in result]
        out.setdefault(panel["id"], []).append((target, series))
    return out


# --------------------------------------------------------------------------- plotting

BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2a2d33"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d", "#fade2a"]


def _formatter(unit: str):
    from matplotlib.ticker import FuncFormatter

    def seconds(v, _):
        if v == 0:
            return "0"
        return f"{v * 1000:.0f} ms" if abs(v) < 1 else f"{v:.3g} s"

    if unit == "s":
        return FuncFormatter(seconds)
    if unit == "percentunit":
        return FuncFormatter(lambda v, _: f"{v * 100:.0f}%")
    return FuncFormatter(lambda v, _: f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}")


UNIT_SUFFIX = {"reqps": " (req/s)", "s": "", "percentunit": "", "short": ""}


def _series_color(name: str, i: int) -> str:
    fixed = {"p50": "#73bf69", "p90": "#f2cc0c", "p99": "#f2495c", "mean": "#8ab8ff", "max waiting": "#f2495c",
             "running": "#73bf69", "waiting": "#ff780a", "generated": "#73bf69", "prompt": "#8ab8ff"}
    return fixed.get(name, PALETTE[i % len(PALETTE)])


def _status_color(name: str, i: int) -> str:
    if re.fullmatch(r"2\d\d", name):
        return "#73bf69"
    if name == "429":
        return "#ff780a"
    if re.fullmatch(r"4\d\d", name):
        return "#f2cc0c"
    if re.fullmatch(r"5\d\d", name):
        return "#f2495c"
    return _series_color(name, i)


def _stat(frame, panel: dict, series: list) -> None:
    if not series:
        frame.text(0.5, 0.4, "No data", color="#8e8e8e", ha="center", va="center", fontsize=16, transform=frame.transAxes)
    elif panel["options"].get("textMode") == "name":
        frame.text(0.5, 0.38, "\n".join(name for _, (name, _, _) in series), color=TEXT, ha="center",
                   va="center", fontsize=16, transform=frame.transAxes)
    else:
        value = series[0][1][2][-1]
        frame.text(0.5, 0.38, f"{value:.0f}", color="#73bf69" if value >= 1 else "#f2495c", ha="center",
                   va="center", fontsize=26, weight="bold", transform=frame.transAxes)


def _bargauge(ax, series: list) -> None:
    """format=heatmap: cumulative le buckets -> counts per bucket, as Grafana shows them."""
    buckets = sorted((float(name), ys[-1]) for _, (name, _, ys) in series)
    counts, prev = [], 0.0
    for le, cum in buckets:
        counts.append((le, max(cum - prev, 0.0)))
        prev = cum
    counts = [(le, c) for le, c in counts if not (math.isinf(le) and c < 0.5)]
    labels = [("+Inf" if math.isinf(le) else f"loops {le:g}" if le == int(le) else f"le {le:g}") for le, _ in counts]
    bars = ax.bar(labels, [c for _, c in counts], color=[PALETTE[i % len(PALETTE)] for i in range(len(counts))], width=0.6)
    for b, (_, c) in zip(bars, counts):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{c:.0f}", ha="center", va="bottom", color=TEXT, fontsize=9)
    ax.set_ylabel("requests", color=TEXT, fontsize=8)


def _timeseries(ax, panel: dict, series: list, start: float, end: float) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    stacked = defaults.get("custom", {}).get("stacking", {}).get("mode") == "normal"
    color = _status_color if "status" in " ".join(t["expr"] for t in panel["targets"]) else _series_color
    lines = [(name, [x - start for x in xs], ys) for _, (name, xs, ys) in series]
    # No observations in a window -> NaN (histogram_quantile of nothing): a gap, as in Grafana.
    lines = [(n, xs, [math.nan if math.isinf(y) else y for y in ys]) for n, xs, ys in lines]
    if stacked and lines:
        grid = sorted({x for _, xs, _ in lines for x in xs})
        ys = [[dict(zip(xs, y)).get(x, 0.0) for x in grid] for _, xs, y in lines]
        ys = [[0.0 if v != v else v for v in row] for row in ys]
        ax.stackplot(grid, *ys, labels=[n for n, _, _ in lines], alpha=0.75,
                     colors=[color(n, i) for i, (n, _, _) in enumerate(lines)])
    else:
        for i, (name, xs, ys) in enumerate(lines):
            dashed = name == "max waiting"
            ax.plot(xs, ys, label=name, color=color(name, i), linewidth=1.4, linestyle="--" if dashed else "-")
    if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode") == "line":
        for step in defaults.get("thresholds", {}).get("steps", [])[1:]:
            ax.axhline(step["value"], color={"orange": "#ff780a", "red": "#f2495c"}.get(step["color"], TEXT),
                       linestyle=":", linewidth=1)
    if "max" in defaults:
        ax.set_ylim(defaults.get("min", 0), defaults["max"] * 1.02)
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlim(0, end - start)
    ax.set_xlabel("seconds into the run", color="#8e8e8e", fontsize=8, labelpad=1)
    if not lines:
        ax.text(0.5, 0.5, "No data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(loc="upper left", fontsize=8, ncol=min(len(lines), 6), frameon=False, labelcolor=TEXT)


def _panel(fig, panel: dict, series: list, box: tuple, span: tuple) -> None:
    """One panel in the figure: its frame and title at `box` (left, bottom, width, height in figure
    fractions), then its stat, bars or lines over `span` (start, end)."""
    left, bottom, width, height = box
    frame = fig.add_axes([left, bottom, width, height])
    frame.set_facecolor(PANEL)
    frame.set_xticks([]), frame.set_yticks([])
    for s in frame.spines.values():
        s.set_color(GRID)
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    frame.text(0.01, 0.97, panel["title"] + UNIT_SUFFIX.get(unit, ""), color=TEXT, fontsize=10.5,
               weight="bold", va="top", transform=frame.transAxes)
    if panel["type"] == "stat":
        return _stat(frame, panel, series)
    wide = panel["type"] == "timeseries"
    ax = fig.add_axes([left + (0.05 if wide else 0.04) * width, bottom + 0.16 * height,
                       width * (0.94 if wide else 0.95), height * 0.66])
    ax.set_facecolor(PANEL)
    ax.tick_params(colors=TEXT, labelsize=8)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.grid(color=GRID, linewidth=0.6)
    ax.set_axisbelow(True)
    ax.yaxis.set_major_formatter(_formatter(unit))
    if panel["type"] == "bargauge":
        _bargauge(ax, series)
    else:
        _timeseries(ax, panel, series, *span)


def plot(dashboard: dict, results: dict, start: float, end: float, path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    width_in, row_in, top_in = 22.0, 0.36, 1.1
    height_in = rows * row_in + top_in
    fig = plt.figure(figsize=(width_in, height_in), facecolor=BG)
    fig.text(0.01, 1 - 0.3 / height_in, dashboard["title"], color=TEXT, fontsize=17, weight="bold", va="center")
    fig.text(0.01, 1 - 0.75 / height_in, subtitle, color="#8e8e8e", fontsize=10, va="center", linespacing=1.5)
    pad_x, pad_y = 0.006, 0.12 / height_in
    for panel in dashboard["panels"]:  # Grafana's grid: 24 columns, rows of row_in inches
        g = panel["gridPos"]
        box = (g["x"] / 24 + pad_x, 1 - (top_in + (g["y"] + g["h"]) * row_in) / height_in + pad_y,
               g["w"] / 24 - 2 * pad_x, g["h"] * row_in / height_in - 2 * pad_y)
        series = [(t, s) for t, ss in results.get(panel["id"], []) for s in ss]
        _panel(fig, panel, series, box, (start, end))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, facecolor=BG)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/render_dashboard.py",
        description="Serve a model under load, scrape it with Debian's Prometheus using deploy/prometheus, evaluate "
                    "every query of deploy/grafana/dashboards/mesh.json through Prometheus' HTTP API and plot "
                    "the dashboard (Grafana's layout) into a PNG.")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model folder (default: model/default, or the tests' random tiny model when that is missing)")
    p.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"), metavar="PNG", help="image to write (default: docs/dashboard.png)")
    p.add_argument("--duration", type=float, default=240, metavar="S", help="seconds of load (default 240)")
    p.add_argument("--peak-clients", type=int, default=14, metavar="N", help="concurrent clients at the peak (default 14)")
    p.add_argument("--max-batch-size", type=int, default=8, help="server --max-batch-size (default 8)")
    p.add_argument("--max-waiting", type=int, default=4, help="server --max-waiting; the peak goes past it (default 4)")
    p.add_argument("--kv-cache-mb", type=float, default=None, help="server --kv-cache-mb (default: the server's)")
    p.add_argument("--prometheus", default=shutil.which("prometheus") or "/usr/bin/prometheus", metavar="BIN",
                   help="Prometheus binary (Debian: apt-get install prometheus)")
    p.add_argument("--seed", type=int, default=0, help="seed of the load generator")
    return p


def pick_model(model: str | None, work: Path) -> tuple[Path, str]:
    """The model to serve and how the subtitle names it: --model, else model/default, else a random tiny one."""
    if model:
        return Path(model), Path(model).name
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL, "default (model/default)"
    from benchmarks.tiny import build_checkpoint  # no default model yet: a random tiny checkpoint

    return build_checkpoint(work / "random-tiny"), "random tiny (benchmarks/tiny.py)"


def start_prometheus(stack: ExitStack, binary: str, target: str, work: Path) -> "Prometheus":
    """Prometheus on a free loopback port scraping `target`, stopped when `stack` closes; waits until ready."""
    port = free_port()
    config = prometheus_config(target, work)
    proc = stack.enter_context(process(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], work / "prometheus.log"))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/-/ready", 60, proc, work / "prometheus.log")
    return Prometheus(url)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.model and not (Path(args.model) / "config.json").is_file():
        print(f"error: no model at {args.model} (config.json missing)", file=sys.stderr)
        return 2
    if not Path(args.prometheus).is_file():
        print(f"error: Prometheus not found at {args.prometheus}; apt-get install prometheus", file=sys.stderr)
        return 2
    import httpx

    dashboard = load_dashboard()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="render-dashboard-")))
        model, model_desc = pick_model(args.model, work)
        server_args = ["--model", str(model), "--host", "127.0.0.1", "--device", "cpu",
                       "--max-batch-size", str(args.max_batch_size), "--max-waiting", str(args.max_waiting)]
        if args.kv_cache_mb is not None:
            server_args += ["--kv-cache-mb", str(args.kv_cache_mb)]
        server = stack.enter_context(ServerProcess(server_args, work / "server.log", threads=0))
        base = server.url
        prom = start_prometheus(stack, args.prometheus, f"127.0.0.1:{server.port}", work)

        (card,) = httpx.get(base + "/v1/models", timeout=10).json()["data"]
        load = Load(base, card["id"], int(card["max_loops"]), args.duration, args.peak_clients, args.seed)
        time.sleep(10)  # a couple of idle scrapes before the load starts
        start = time.time()
        counts = load.run()
        time.sleep(15)  # the last scrapes and rule evaluations after the load
        end = time.time()
        if "up" not in prom.target_health():
            raise RuntimeError(f"Prometheus never scraped the server: {prom.target_health()}")

        results = evaluate(prom, dashboard, start - 10, end, step=5, rate_interval="20s")
        firing = sorted({f"{a['labels']['alertname']} ({a['state']})" for a in prom.alerts()})
        served = sum(c for s, c in counts.items())
        settings = f"--max-batch-size {args.max_batch_size} --max-waiting {args.max_waiting}"
        if args.kv_cache_mb is not None:
            settings += f" --kv-cache-mb {args.kv_cache_mb:g}"
        subtitle = (f"{model_desc} model on CPU ({settings}); {args.duration:.0f} s of load ramping 1 -> "
                    f"{args.peak_clients} -> 2 clients. Every panel is its query from deploy/grafana/dashboards/mesh.json, "
                    f"evaluated by Prometheus {prom.version()}.\n"
                    f"{served} requests, by status: {', '.join(f'{s}: {c}' for s, c in counts.items())}. "
                    f"Alerts (deploy/prometheus/alerts.yml) at the end: {', '.join(firing) or 'none'}.")
        plot(dashboard, results, start - 10, end, Path(args.out), subtitle)
        print(f"requests by status: {counts}")
        print(f"alerts at the end: {firing or 'none'}")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
