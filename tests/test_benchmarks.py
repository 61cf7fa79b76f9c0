"""Smoke tests of the benchmark machinery (benchmarks/) on a tiny random model: the JSON it writes has
the headline figures, finite, and the measured facts that do not depend on timing hold. No timing
assertions (speed targets are reported by `make bench`, not tested)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import run
from benchmarks.common import linear_fit, percentile, summary

HEADLINE = ("decode_speedup_vs_hf_b1", "decode_speedup_vs_hf_b32", "depth_fit_r2", "mesh_overhead_vs_base",
            "mixed_depth_cost_ratio")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    assert run.main(["--tiny", "--quiet", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_quick_writes_finite_headline(quick):
    for key in HEADLINE:
        assert key in quick["headline"], key
        assert math.isfinite(quick["headline"][key]), (key, quick["headline"][key])
    assert quick["headline"]["decode_speedup_vs_hf_b1"] > 0 and quick["headline"]["decode_speedup_vs_hf_b32"] > 0
    assert 0 < quick["machine"]["torch_threads"] and quick["machine"]["cpu"]
    for row in quick["decode"]["rows"]:
        assert row["ours_tok_s"] > 0 and row["hf_tok_s"] > 0 and len(row["ours_s"]) == quick["decode"]["reps"]
    assert quick["decode"]["model"]["hf_attention"] == "sdpa"


def test_kv_bytes_measured_in_the_pool_match_the_formula(quick):
    depth = quick["depth"]
    assert [k["loops"] for k in depth["kv"]] == depth["depths"]
    for k in depth["kv"]:
        assert k["measured"] == k["formula"] == k["model"] == k["accounted"], k
        assert k["tiers_allocated_beyond_depth"] == 0  # a depth-K row holds nothing for iterations it skips
    sizes = [k["measured"] for k in depth["kv"]]
    assert all(b > a for a, b in zip(sizes, sizes[1:]))


def test_admission_takes_the_blocks_needed_now(quick):
    """The paged pool admits by the prompt's blocks, not prompt + max_tokens: more requests than the same
    bytes reserved per request would hold, fewer at deeper depths."""
    rows = quick["mixed"]["admission"]["rows"]
    singles = [r for r in rows if isinstance(r["loops"], int)]
    for r in singles:
        assert r["admitted"] > r["budget_over_request_bytes"] >= 1, r
    admitted = [r["admitted"] for r in singles]
    assert admitted == sorted(admitted, reverse=True) and admitted[0] > admitted[-1]  # deeper requests cost more


def test_serving_load_against_a_real_server(tmp_path):
    out = tmp_path / "serving.json"
    assert run.main(["--tiny", "--quiet", "--sections", "serving", "--out", str(out)]) == 0
    s = json.loads(out.read_text())["serving"]
    assert s["errors_total"] == 0, [lv["error_examples"] for lv in s["levels"]]
    assert {lv["kind"] for lv in s["levels"]} == {"concurrency", "rate"}
    for lv in s["levels"]:
        assert lv["completed"] == lv["requests"] and lv["output_tokens"] == lv["requests"] * s["max_tokens"]
        for metric in ("ttft_ms", "tpot_ms", "itl_ms"):
            assert all(math.isfinite(v) and v >= 0 for v in lv[metric].values()), (lv["label"], metric)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert run.main(["--out", str(tmp_path / "x.json"), "--sections", "decode,nope"]) == 2
    assert "unknown section(s) nope" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_statistics_helpers():
    fit = linear_fit([1, 2, 3, 4], [3.0, 5.0, 7.0, 9.0])
    assert fit["a"] == pytest.approx(1.0) and fit["b"] == pytest.approx(2.0) and fit["r2"] == pytest.approx(1.0)
    assert linear_fit([1, 2, 3], [1.0, 3.0, 2.0])["r2"] == pytest.approx(0.25)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert summary([1.0, 2.0, 6.0]) == {"mean": 3.0, "median": 2.0, "p99": pytest.approx(5.92)}
