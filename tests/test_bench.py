"""The benchmark: a real smoke run end to end (structure, not timings), and its measuring machinery."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from ecqae import bench, cli

CONFIGS = sorted((ROOT / "firmware_configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``ecqae bench --smoke`` through the CLI: every stage for real, on 1,000 generated wafers."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ecqae", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, out


@pytest.mark.slow
def test_smoke_run_succeeds_and_prints_the_table(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.is_file() and not list(out.parent.glob(".bench.json.*"))  # written atomically, no leftovers
    for text in ("stage", "median", "peak MiB", "targets:", "bench: wrote"):
        assert text in proc.stdout


@pytest.mark.slow
def test_smoke_report_has_every_stage_with_statistics(smoke):
    _, out = smoke
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["failed"] == []
    assert rep["settings"]["wafers"] == bench.SMOKE_WAFERS and rep["settings"]["reps"] == bench.SMOKE_REPS
    names = bench._project_names(CONFIGS)
    rows = {r["key"]: r for r in rep["rows"]}
    expected = {"data.generate", "data.csv", "train.epoch", "inference.qkeras", "inference.golden", "verify.all"}
    expected |= {"evaluation.reconstruct", "evaluation.emd", "firmware.make_hls"}
    expected |= {f"inference.csim.{n}" for n in names}
    expected |= {f"firmware.{n}.{what}" for n in names for what in ("write", "compile")}
    assert expected <= set(rows), expected - set(rows)
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r["status"])
        assert 0 < r["min"] <= r["median"] <= r["max"], key
        assert r["reps"] == len(r["seconds"]) >= 1 and all(s > 0 for s in r["seconds"]), key
        assert r["peak_mib"] > 10, key
        if not key.startswith("firmware."):
            assert r["reps"] == bench.SMOKE_REPS and r["wafers"] > 0, key
            assert 0 < r["baseline_mib"] <= r["peak_mib"], key
            if r["unit"] == "wafers/s":  # the median of the per-repetition rates, from the recorded seconds
                rates = sorted(r["wafers"] / s for s in r["seconds"])
                assert r["min"] == pytest.approx(rates[0], rel=1e-3) and r["max"] == pytest.approx(rates[-1], rel=1e-3)
    assert rows["data.csv"]["wafers"] == bench.SMOKE_WAFERS
    assert rows["train.epoch"]["wafers"] == round(0.7 * bench.SMOKE_WAFERS)  # the train split
    assert rows["verify.all"]["info"]["bit_exact"] and rows["verify.all"]["info"]["mismatches"] == 0
    assert rows["verify.all"]["wafers"] > bench.SMOKE_WAFERS  # + the test split and the corner cases


@pytest.mark.slow
def test_smoke_report_records_machine_load_and_targets(smoke):
    _, out = smoke
    rep = json.loads(out.read_text())
    m = rep["machine"]
    assert m["cores"] >= 1 and 1 <= m["usable_cores"] <= m["cores"] and m["cpu_model"]
    assert m["python"].startswith("3.") and m["packages"]["tensorflow"] and m["packages"]["hls4ml"]
    assert len(rep["load_average"]["start"]) == 3 and len(rep["load_average"]["end"]) == 3
    by_key: dict[str, list[dict]] = {}
    for t in rep["targets"]:
        base = "inference.csim" if t["key"].startswith("inference.csim.") else t["key"]
        by_key.setdefault(base, []).append(t)
    assert set(by_key) == set(bench.TARGETS)
    assert len(by_key["inference.csim"]) == len(CONFIGS)  # one C-simulation target per backend
    for base, ts in by_key.items():
        for t in ts:
            assert t["status"].split(" ")[0] in ("pass", "short", "n/a:"), t
            if t["status"].startswith(("pass", "short")):
                limit = bench.TARGETS[base]
                ok = t["value"] >= limit["min"] if "min" in limit else t["value"] < limit["max_s"]
                assert t["status"].startswith("pass") == ok, t
    assert by_key["train.memory"][0]["status"].startswith("n/a")  # 1,000,000 wafers were not trained here


def test_peak_memory_is_per_child_not_cumulative():
    """os.wait4 gives each child's own peak: a small child after a big one is not charged the big one's.

    Measured from a small parent: Linux counts a child's resident set before
    exec as its own, so a parent holding TensorFlow (as pytest may) would inflate it.
    """
    script = (
        "import json, sys; from ecqae import bench; log = lambda _m: None; "
        "big = bench.run_child([sys.executable, '-c', 'b = bytes([120]) * (300 * 2**20)'], log=log); "
        "small = bench.run_child([sys.executable, '-c', 'pass'], log=log); "
        "print(json.dumps([big.peak_mib, small.peak_mib, big.error, small.error]))"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    big, small, big_error, small_error = json.loads(out.stdout.strip().splitlines()[-1])
    assert big_error is None and small_error is None
    assert big > 300
    assert small < 100


def test_a_crashing_child_is_reported_not_raised():
    job = bench.run_child(
        [sys.executable, "-c", "import os, signal; print('about to die'); os.kill(os.getpid(), signal.SIGKILL)"],
        log=lambda _m: None,
    )
    assert job.error == "killed by signal 9: about to die"


def test_a_failing_stage_costs_only_its_row(tmp_path):
    runner = bench._Runner(tmp_path, log=lambda _m: None)
    steps = [
        bench.Step("bad@1", "generate", {"wafers": -5, "seed": 0, "reps": 1}),
        bench.Step("good@1", "generate", {"wafers": 300, "seed": 0, "reps": 2}),
        bench.Step("after@1", "generate", {"wafers": 300, "seed": 0, "reps": 1}, needs=["bad@1"]),
    ]
    runner.run(steps, "one child")
    assert runner.jobs == 1
    assert runner.results["bad@1"]["error"] == "failed: ValueError: n must be >= 0"
    assert runner.results["after@1"]["error"] == "n/a: needs bad (failed)"
    good = runner.results["good@1"]
    assert good["ok"] and len(good["figures"][0]["seconds"]) == 2 and good["job_steps"] == 3
    rows = bench._rows(runner, steps, 300)
    assert [r["status"] for r in rows] == ["failed: ValueError: n must be >= 0", "ok", "n/a: needs bad (failed)"]
    assert rows[1]["wafers"] == 300 and rows[1]["memory"].startswith("peak of a child shared by 3")
    # A step needing a failed step of an earlier job is not started at all.
    runner.run([bench.Step("later@1", "generate", {"wafers": 300, "seed": 0, "reps": 1}, ["bad@1"])], "skipped")
    assert runner.jobs == 1 and runner.results["later@1"]["error"] == "n/a: needs bad (failed)"


def test_missing_module_or_function_is_na_without_running(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.NEEDS, "emd", {"no_such_module": ("emd",)})
    assert bench._missing("emd") == "n/a: module missing (ecqae/no_such_module.py)"
    monkeypatch.setitem(bench.NEEDS, "generate", {"data": ("generate", "no_such_function")})
    assert bench._missing("generate") == "n/a: module missing (ecqae/data.py has no no_such_function)"
    runner = bench._Runner(tmp_path, log=lambda _m: None)
    runner.run([bench.Step("generate@1", "generate", {"wafers": 300, "seed": 0, "reps": 1})], "not started")
    assert runner.jobs == 0
    [row] = bench._rows(runner, [bench.Step("generate@1", "generate", {})], 300)
    assert row["status"].startswith("n/a: module missing") and row["median"] is None and row["target"] is None
    for stage in bench.STAGES:  # and every stage the benchmark knows is declared
        assert stage in bench.NEEDS


def test_targets_judge_pass_and_short_at_the_boundary():
    row = {"median": 50_000.0, "wafers": 1000, "info": {}}
    assert bench._judge("train.epoch", row)["status"] == "pass"
    assert bench._judge("train.epoch", {**row, "median": 49_999.0})["status"] == "short"
    assert bench._judge("inference.csim.any_backend", {**row, "median": 99_999.0})["status"] == "short"
    assert bench._judge("data.generate", row) is None  # no target
    # verify: seconds for W wafers, projected linearly to 1,000,000 and bit-exactness required.
    v = {"median": 5.0, "wafers": 100_000, "info": {"bit_exact": True}}
    assert bench._judge("verify.all", v) == {
        "target": bench.TARGETS["verify.all"]["text"],
        "value": 50.0,
        "status": "pass (projected)",
        "note": "projected from 100,000 wafers",
    }
    assert bench._judge("verify.all", {**v, "median": 7.0})["status"] == "short (projected)"
    inexact = bench._judge("verify.all", {**v, "info": {"bit_exact": False, "mismatches": 3}})
    assert inexact["status"] == "short (projected)" and "NOT bit-exact (3 mismatched latents)" in inexact["note"]
    assert bench._judge("verify.all", {**v, "wafers": 2_000_000, "median": 100.0})["status"] == "pass"


def test_targets_stated_for_a_million_wafers_use_that_measurement_when_there_is_one():
    def verify_row(wafers: int, seconds: float) -> dict:
        row = {"key": "verify.all", "label": "verify", "status": "ok", "median": seconds, "wafers": wafers,
               "info": {"bit_exact": True}}  # fmt: skip
        return {**row, "target": bench._judge("verify.all", row)}

    small, big = verify_row(100_000, 5.0), verify_row(1_000_000, 70.0)
    [v] = [t for t in bench._targets([small], [small, big]) if t["key"] == "verify.all"]
    assert v["status"] == "short" and v["value"] == 70.0 and v["note"] == "scaled from 1,000,000 wafers"
    [v] = [t for t in bench._targets([small], [small]) if t["key"] == "verify.all"]
    assert v["status"] == "pass (projected)" and v["value"] == 50.0
    targets = {t["key"]: t for t in bench._targets([small], [small])}
    assert targets["train.memory"]["status"].startswith("n/a: not measured")
    assert targets["evaluation.emd"]["status"] == "n/a: not measured"


def test_scaling_summary_reports_growth_per_size_step():
    def row(n: int, seconds: float, peak: float) -> dict:
        return {"key": "x", "status": "ok", "seconds": [seconds, seconds * 1.1, seconds * 0.9], "peak_mib": peak,
                "baseline_mib": 100.0, "memory": "own child", "info": {"dataset": n}}  # fmt: skip

    rows = [row(1000, 0.1, 110.0), row(10_000, 1.0, 200.0), row(100_000, 10.0, 1100.0)]
    [s] = bench._scaling_summary(rows, (1000, 10_000, 100_000))
    assert [p["wafers"] for p in s["points"]] == [1000, 10_000, 100_000]
    assert [g["time_x"] for g in s["growth"]] == [10.0, 10.0]
    assert [g["memory_x"] for g in s["growth"]] == [10.0, 10.0]  # 10 -> 100 -> 1000 MiB above the baseline
    assert s["bytes_per_wafer_above_baseline"] == round(1000 * 2**20 / 100_000)
    # A peak shared with other stages (smoke) says nothing about this stage's memory.
    shared = [{**r, "memory": "peak of a child shared by 3 stages"} for r in rows]
    [s] = bench._scaling_summary(shared, (1000, 10_000, 100_000))
    assert [g["time_x"] for g in s["growth"]] == [10.0, 10.0] and "memory_x" not in s["growth"][0]
    assert s["bytes_per_wafer_above_baseline"] is None


def test_cli_rejects_a_too_small_benchmark(capsys):
    assert cli.main(["bench", "--wafers", "10", "--out", "unused.json"]) == 2
    assert capsys.readouterr().err.strip() == "ecqae: error: --wafers must be at least 100, got 10"
    assert not (ROOT / "unused.json").exists()
