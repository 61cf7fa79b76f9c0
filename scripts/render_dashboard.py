"""Render the Grafana dashboard from real data, without Grafana.

Grafana cannot be installed here, so this does what Grafana does for each panel: expand the
dashboard's variables in every query, ask Prometheus (Debian's `prometheus` package, run on
loopback against a local MeSH server under load) through its HTTP API, and plot the answers with
matplotlib in the dashboard's own grid. The result is docs/dashboard.png.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mesh.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


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
