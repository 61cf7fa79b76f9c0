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


# ---- benchmarks/engine_v2.py: its machinery on a tiny checkpoint, this tree on both sides -----------
class InProcess:
    """A worker without the subprocess: the same task functions, called here (this tree's engine)."""

    def call(self, task, **kw):
        from benchmarks import engine_v2

        return engine_v2.TASKS[task](**kw)


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    from benchmarks import engine_v2

    models = engine_v2.make_models(True, tmp_path_factory.mktemp("v2"), seed=0)
    plan = engine_v2.PLANS["tiny"]
    workers = {"baseline": InProcess(), "new": InProcess()}
    r = {"plan": "tiny", "baseline_ref": "this checkout", "loops": engine_v2.LOOPS, "threads": 1,
         "load_average": {"start": [0.0]}}
    for target in ("admission", "prefix", "chunked", "decode", "profile"):
        r[target] = engine_v2.RUNNERS[target](workers, models, plan[target], 0)
    r["targets"] = engine_v2.verdicts(r)
    return r


def test_engine_v2_admission_offers_every_request_and_stops_where_the_stop_string_says(v2):
    a = v2["admission"]
    assert a["stops_found"] >= 1
    assert a["identical_outputs"] == a["requests"]  # one engine on both sides: the same greedy tokens
    assert a["new"]["stopped"] == a["baseline"]["stopped"] >= a["stops_found"]
    assert 1 <= a["new"]["most_running"] <= a["requests"]


def test_engine_v2_prefix_hit_counts_every_full_block_of_the_shared_prefix(v2):
    x = v2["prefix"]
    assert x["new"]["hit_tokens_on_hits"] == [x["prefix_len"]] * x["rounds"]  # 64 tokens = 4 blocks of 16
    assert x["new"]["hit_tokens"] == x["prefix_len"] * x["rounds"]


def test_engine_v2_chunked_prefill_splits_the_long_prompt_by_the_budget(v2):
    c = v2["chunked"]
    steps = {s["max_num_batched_tokens"]: s["prefill_steps"] for s in c["sweep"]}
    # 120 tokens at 16 a step less 3 decode rows -> 10 steps; at 64 a step -> 2; the default 256 -> 1
    assert steps == {16: 10, 64: 2}
    assert c["baseline"]["prefill_steps"] == 1
    assert all(s["max_gap_during_ms"] > 0 for s in c["sweep"])


def test_engine_v2_decode_profile_and_report(v2):
    from benchmarks import engine_v2

    assert [(d["prompt_len"], d["batch"]) for d in v2["decode"]["rows"]] == [(8, 1), (8, 4), (40, 1), (40, 4)]
    assert all(d["greedy_identical"] and d["new_tok_s"] > 0 for d in v2["decode"]["rows"])
    (case,) = v2["profile"]["cases"]
    assert case["new"]["ops"] and "runner.run" in case["new"]["parts_ms_per_step"]  # the new engine's runner was timed
    assert list(v2["profile"]["forward_ms_by_tokens"]) == ["1", "8"]
    names = [t["target"] for t in v2["targets"]]
    assert len(names) == 1 + 1 + 2 + 4 and names[0].startswith("admission")
    text = engine_v2.markdown(v2)
    assert "Engine v2 against this checkout" in text and "--max-num-batched-tokens 16" in text


def test_engine_v2_worker_process_answers_and_reports_errors(tmp_path):
    from benchmarks import engine_v2

    w = engine_v2.Worker("new", engine_v2.ROOT, 1, tmp_path / "w.log")
    try:
        info = w.call("info")
        assert info["paged"] is True and info["engine_file"].startswith(str(engine_v2.ROOT))
        with pytest.raises(RuntimeError, match="task nope"):
            w.call("nope")
    finally:
        w.close()


def test_engine_v2_bad_target_is_a_one_line_error(tmp_path, capsys):
    from benchmarks import engine_v2

    assert engine_v2.main(["--targets", "admission,nope", "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.strip() == "benchmarks.engine_v2: error: unknown target(s) nope"
