"""`evaluate` on real small runs (CALQ_output.csv): report structure, value ranges, plots, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ecqae import artifacts, chip, cli, data, evaluate, metrics, train
from ecqae.errors import EcqaeError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BINS = ["all", "1.5-2.0", "2.0-2.5", "2.5-3.0"]


@pytest.fixture(scope="module")
def full_report(calq_run, calq_run_plain, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "evaluation"
    lines: list[str] = []
    report = evaluate.evaluate(calq_run, out, ablation=calq_run_plain, log=lines.append)
    return report, out, lines


def _stats(report, name, elinks, bin_key, metric):
    r = next(r for r in report["results"] if r["name"] == name and r["elinks"] == elinks)
    return r["bins"][bin_key][metric]


def test_every_algorithm_budget_and_eta_bin_is_reported(full_report, calq_run):
    report, out, _ = full_report
    n_test = len(train.load_run(calq_run).test_wafers())
    assert report["wafers"]["n"] == n_test
    got = {(r["name"], r["elinks"]) for r in report["results"]}
    expected = {(n, e) for e in (2, 3, 4, 5) for n in ("threshold_1.35", "threshold_2", "best_choice", "stc")}
    expected |= {("ae", 5), ("ae_ablation", 5)}
    assert got == expected
    assert report["run"]["conditional"] is True and report["ablation"]["conditional"] is False
    labels = {r["name"]: r["label"] for r in report["results"]}
    assert labels["ae"] == "AE conditional 9b" and labels["ae_ablation"] == "AE plain 9b"
    assert list(report["eta_bins"]) == BINS[1:]
    assert [b["thickness_um"] for b in report["eta_bins"].values()] == [300, 200, 120]
    for r in report["results"]:
        assert list(r["bins"]) == BINS
        assert sum(r["bins"][k]["n"] for k in BINS[1:]) == r["bins"]["all"]["n"] == n_test
        for k in BINS:
            if r["bins"][k]["n"] == 0:
                continue
            for m in metrics.METRICS:
                s = r["bins"][k][m]
                assert set(s) == {"n", "mean", "median", "p16", "p84"}
                assert s["p16"] <= s["median"] <= s["p84"]
    # The JSON on disk is the returned report.
    assert json.loads((out / "evaluation.json").read_text()) == json.loads(json.dumps(report))


def test_values_lie_in_their_physical_ranges(full_report):
    report, _, _ = full_report
    for r in report["results"]:
        for k in BINS:
            b = r["bins"][k]
            if b["n"] == 0:
                continue
            assert 0.0 <= b["empty_output_fraction"] <= 1.0
            emd = b["emd"]
            if emd["n"]:
                assert 0.0 <= emd["p16"] and emd["p84"] <= metrics.MAX_DISTANCE
                assert 0.0 <= emd["mean"] <= metrics.MAX_DISTANCE
                assert b["centroid"]["p16"] >= 0.0
            # baselines send a subset of the true charges; the AE sends the 9-bit sum's midpoint
            top = 1.0 + 1 / 32 + 1e-6 if r["name"].startswith("ae") else 1.0 + 1e-6
            assert b["sum_ratio"]["p16"] >= 0.0 and b["sum_ratio"]["p84"] <= top
            assert 0 <= b["occupancy"]["p16"] and b["occupancy"]["p84"] <= chip.N_TC
    for e in (2, 3, 4, 5):
        stc = _stats(report, "stc", e, "all", "sum_ratio")
        assert stc["p16"] == stc["p84"] == 1.0  # STC conserves the charge
        # More bandwidth never makes best-choice worse.
        if e > 2:
            assert (
                _stats(report, "best_choice", e, "all", "emd")["mean"]
                <= _stats(report, "best_choice", e - 1, "all", "emd")["mean"]
            )
    for name in ("ae", "ae_ablation"):
        ratio = _stats(report, name, 5, "all", "sum_ratio")
        # Decoder fractions sum to 1, times the 9-bit sum's midpoint (within half a mantissa step, 1/32).
        assert 1 - 1 / 32 - 1e-6 <= ratio["p16"] and ratio["p84"] <= 1 + 1 / 32 + 1e-6
        assert _stats(report, name, 5, "all", "emd")["n"] == report["wafers"]["n"]


def test_autoencoder_reconstruction_conserves_the_decoded_sum(calq_run):
    run = train.load_run(calq_run)
    wafers = run.test_wafers().take(np.arange(300))
    reco = evaluate.reconstruct(run.encoder(), run.decoder(), wafers)
    assert reco.shape == (300, 48) and np.all(reco >= 0)
    np.testing.assert_allclose(reco.sum(axis=1), data.prepare(wafers).sum_decoded, rtol=1e-5)


def test_plots_table_and_progress(full_report):
    report, out, lines = full_report
    assert report["plots"] == list(evaluate.PLOTS)
    for name in evaluate.PLOTS:
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 20_000, name
    table = (out / "evaluation.txt").read_text()
    for r in report["results"]:
        assert r["label"] in table
    for title in evaluate.TABLE_TITLES.values():
        assert title in table
    text = "\n".join(lines)
    assert "reconstructed" in text and "metrics:" in text and "wrote" in text
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_default_out_dir_and_wafer_limit(calq_run):
    report = evaluate.evaluate(calq_run, None, n_wafers=150, log=lambda _m: None)
    assert report["wafers"]["n"] == 150 and report["ablation"] is None
    assert not any(r["name"] == "ae_ablation" for r in report["results"])
    on_disk = json.loads((calq_run / "evaluation" / "evaluation.json").read_text())
    assert on_disk["wafers"]["n"] == 150
    train.load_run(calq_run)  # the run directory is still intact


def test_ablation_judged_on_other_wafers_is_refused(calq_run, tmp_path):
    other = tmp_path / "other_run"
    shutil.copytree(calq_run, other, ignore=shutil.ignore_patterns("evaluation", "checkpoint"))
    w = data.load_wafers(other / "test_split.npz")
    data.save_wafers(other / "test_split.npz", w.take(np.arange(len(w) - 1)))
    record = artifacts.read_complete(other)
    artifacts.mark_complete(other, list(record["files"]), {k: v for k, v in record.items() if k != "files"})
    with pytest.raises(EcqaeError, match="test split differs"):
        evaluate.evaluate(calq_run, tmp_path / "ev", ablation=other, log=lambda _m: None)


def test_cli_evaluate_and_its_errors(calq_run, tmp_path, capsys):
    assert cli.main(["evaluate", "--run", str(calq_run), "--out", str(tmp_path / "ev"), "--wafers", "120"]) == 0
    out = capsys.readouterr().out
    assert "EMD [units: 1.21 cm, neighbouring TCs = 2]" in out and "super-trigger-cell" in out
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["wafers"]["n"] == 120

    assert cli.main(["evaluate", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ecqae: error:") and "missing" in err and "\n" not in err
    assert cli.main(["evaluate", "--run", str(calq_run), "--wafers", "-3"]) == 2
    assert "--wafers" in capsys.readouterr().err
