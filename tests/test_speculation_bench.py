"""Smoke test of benchmarks/speculation.py (`--tiny`: a tiny random model, a few tokens, one round): the
JSON it writes has every section and target, finite, and the facts that do not depend on timing hold
(greedy tokens equal with and without speculation, round accounting). No timing assertions: speed
targets are what `make bench-spec` prints."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import speculation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "spec.json"
    assert speculation.main(["--tiny", "--quiet", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_greedy_tokens_equal_with_and_without_speculation(tiny):
    plan = tiny["plan"]
    ident = tiny["batch1"]["identity"]
    configs = sum(d < k for k in plan["depths"] for d in plan["ds"] for _ in plan["gs"])
    assert ident["rows"] == plan["reps"] * configs and ident["equal"] == ident["rows"], ident
    mixed = tiny["concurrency"]["mixed"]
    assert mixed["default"]["identical_rows"] == mixed["always"]["identical_rows"] == plan["conc_rows"]
    assert mixed["always"]["drafted"] > 0  # every row deeper than d drafts; the default stops above the crossover


def test_every_round_is_accounted(tiny):
    plan = tiny["plan"]
    rows = tiny["batch1"]["rows"]
    assert {(r["loops"], r["d"], r["g"]) for r in rows} == {(k, d, g) for k in plan["depths"] for d in plan["ds"]
                                                           for g in plan["gs"] if d < k}
    for r in rows:
        assert 1 <= r["tokens_per_round"] <= r["g"], r  # a round emits its accepted drafts and a correction, at most g
        assert 0 <= r["accepted"] <= r["emitted_by_verify"] <= r["drafted"] and 0 <= r["acceptance"] <= 1, r
        for key in ("speedup", "speedup_cpu_time", "bound", "share_of_bound", "ms_depth_k_step", "ms_depth_d_step",
                    "ms_draft_step", "ms_verify"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert [a["loops"] for a in tiny["batch1"]["acceptance"]] == [k for k in plan["depths"] for d in plan["ds"] if d < k]


def test_concurrency_sweep_and_targets(tiny):
    conc = tiny["concurrency"]
    assert [r["rows"] for r in conc["sweep"]] == tiny["plan"]["batches"]
    assert conc["crossover_rows"] in (*tiny["plan"]["batches"], None)
    for r in (conc["mixed"], *conc["sweep"]):
        for v in (r.get("default"), r["always"]):
            if v is not None:
                assert v["tok_s"] > 0 and r["tok_s_off"] > 0 and math.isfinite(v["ratio"]), r
    assert tiny["hf"]["ratio_plain"] > 0 and tiny["hf"]["ratio_speculative"] > 0
    names = " ".join(t["target"] for t in tiny["targets"])
    for what in ("speedup at depth 4", "share of the bound", "mixed depths", "identical", "HF"):
        assert what in names, what
    assert ("speedup at the default depth" in names) == (tiny["default_loops"] in tiny["plan"]["depths"][1:])
    assert all(math.isfinite(t["value"]) for t in tiny["targets"])
