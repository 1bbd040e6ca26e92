"""Verification: real C simulation against real QKeras, every latent, and a check that can fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS, TTBAR
from test_firmware import ASIC, ASIC_BASE

from ecqae import chip, data, firmware, verify
from ecqae.cli import main
from ecqae.errors import EcqaeError


@pytest.fixture(scope="module")
def ttbar():
    return data.read_csv(TTBAR, eta="2.2")


# ----------------------------------------------------------------------------- corner cases


def test_corner_cases_cover_the_input_space():
    w = verify.corner_cases()
    q = w.charges.astype(np.int64)
    assert q.shape[1] == chip.N_TC and q.min() >= 0 and q.max() == chip.CHARGE_MAX
    assert np.all(w.eta == verify.CORNER_ETA)
    x, total = chip.normalise(q)
    nonzero = (q > 0).sum(axis=1)
    for tc in range(chip.N_TC):  # all charge in one TC, for every TC, smallest and largest
        single = (nonzero == 1) & (q[:, tc] > 0)
        assert set(q[single, tc]) >= {1, chip.CHARGE_MAX}
        assert np.all(x[single, tc] == 1.0)
        assert np.any(x[:, tc] == 1 / 256)  # the smallest non-zero input, at every TC
    assert total.min() == 0 and np.any(total == 1)  # empty and smallest non-zero wafer
    uniform = np.all(q == q[:, :1], axis=1) & (q[:, 0] > 0)
    assert uniform.sum() >= 4
    assert np.any(np.all(q == chip.CHARGE_MAX, axis=1))  # every TC at the 22-bit limit
    assert np.any(total >= chip.CHARGE_MAX - chip.N_TC)  # sums at the 22-bit limit
    grid = np.unique(np.rint(x * 256))
    assert grid.min() == 0 and grid.max() == 256 and len(grid) > 200  # inputs across the whole grid
    assert np.array_equal(verify.corner_cases().charges, w.charges)  # deterministic


# ----------------------------------------------------------------------------- bit-exact


def _summary(path: Path) -> dict:
    return json.loads((path / "verify.json").read_text())


def test_bit_exact_on_real_wafers_both_backends(calq_run, hls9, ttbar):
    """Saved test split + corner cases + every ttbar wafer: every latent of both backends equals QKeras."""
    lines: list[str] = []
    hls_dir = hls9["econt_asic"].parent
    ok = verify.verify_all(calq_run, CONFIGS, hls_dir, extra=ttbar, log=lines.append)
    print("\n".join(lines))
    summary = _summary(hls_dir)
    assert ok and summary["ok"], "\n".join(lines)
    for name in ("econt_asic", "fpga_vitis"):
        rep = summary["configs"][name]
        assert rep["wafers"] >= 10_000 + len(verify.corner_cases())
        assert rep["sources"]["corner"] == len(verify.corner_cases())
        assert rep["sources"]["ttbar_0PU.csv"] == len(ttbar)
        assert rep["latents"] == rep["wafers"] * chip.N_LATENT
        for impl in ("csim", "golden"):
            assert rep["compared"][impl]["mismatches"] == 0
            assert rep["compared"][impl]["exact"] == rep["latents"]
        assert rep["reconstruction"]["equal"] and rep["reconstruction"]["wafers"] == rep["sources"]["test"]
        assert rep["wafers_per_s"]["csim"] > 0 and rep["compile_seconds"] > 0
    assert any("0 mismatches" in line for line in lines)


def test_bit_exact_with_3bit_latents(calq_run_3bit, hls3):
    lines: list[str] = []
    ok = verify.verify_all(calq_run_3bit, CONFIGS, hls3["econt_asic"].parent, log=lines.append)
    assert ok, "\n".join(lines)
    rep = _summary(hls3["econt_asic"].parent)["configs"]["econt_asic"]
    assert rep["compared"]["csim"]["mismatches"] == 0 and rep["latents"] > 0


def test_verify_refuses_projects_of_another_run(calq_run_3bit, hls9, capsys):
    code = main(["verify", "--run", str(calq_run_3bit), "--hls", str(hls9["econt_asic"].parent), str(ASIC)])
    err = capsys.readouterr().err
    assert code == 2 and "built from run" in err and "rerun make hls" in err


def test_verify_missing_project(calq_run, tmp_path, capsys):
    code = main(["verify", "--run", str(calq_run), "--hls", str(tmp_path), str(ASIC)])
    assert code == 2 and "no HLS project here (run make hls first)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the check can fail


def test_truncation_instead_of_convergent_rounding_is_caught(calq_run, tmp_path, capsys):
    """TRN on the latent (QKeras rounds half to even): make verify must fail, readably, naming the layer."""
    bad = tmp_path / "asic_trn.yaml"
    bad.write_text(ASIC_BASE + "testbench_wafers: 200\nlayers:\n  latent: {result: 'ufixed<9,1,TRN,SAT>'}\n")
    hls_dir = tmp_path / "hls"
    assert main(["hls", "--run", str(calq_run), "--out", str(hls_dir), str(bad)]) == 1  # the testbench check fails
    assert "asic_trn: C simulation differs from QKeras" in capsys.readouterr().err
    capsys.readouterr()
    code = main(
        ["verify", "--run", str(calq_run), "--hls", str(hls_dir), "--data", str(TTBAR), "--data-rows", "500", str(bad)]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    csim_line = next(line for line in out.splitlines() if line.strip().startswith("csim"))
    assert " 0 mismatches" not in csim_line
    assert "latent " in out and "qkeras" in out and ", csim " in out  # (wafer, latent, QKeras, C-sim) lines
    assert "first divergence: layer 'latent'" in out
    assert "DIFFERS from QKeras latents" in out and "FAIL" in out
    rep = _summary(hls_dir)["configs"]["asic_trn"]
    assert not rep["ok"] and rep["compared"]["csim"]["mismatches"] > 0
    assert rep["compared"]["golden"]["mismatches"] == 0  # the integer model still agrees with QKeras
    assert rep["divergence"]["layer"] == "latent" and rep["divergence"]["note"] == ""
    first = rep["compared"]["csim"]["first"][0]
    assert first["qkeras"] - first["csim"] == 1  # truncation is one code low where QKeras rounds up
    assert rep["sources"]["ttbar_0PU.csv"] == 500
    assert not list(hls_dir.glob(".asic_trn.trace*"))  # the traced rebuild is cleaned up


def test_verify_argument_errors(calq_run, tmp_path, capsys):
    assert main(["verify", "--run", str(calq_run), "--hls", str(tmp_path), "--wafers", "-1", str(ASIC)]) == 2
    assert "--wafers must be >= 0" in capsys.readouterr().err
    with pytest.raises(EcqaeError, match="no firmware configs"):
        verify.verify_all(calq_run, [], tmp_path)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("a,b\n1,2\n")
    assert main(["verify", "--run", str(calq_run), "--data", str(bad_csv), str(ASIC)]) == 2
    assert "no CALQ_* columns" in capsys.readouterr().err


def test_latent_codes_keep_off_grid_values_visible():
    from ecqae.config import QuantConfig

    q = QuantConfig(latent_bits=9)
    assert firmware.latent_codes(np.array([[0.5, 1.0]]), q).dtype == np.int64
    codes = firmware.latent_codes(np.array([[0.5, 0.5 + 2**-10]]), q)
    assert codes.dtype == np.float64 and codes[0, 1] == 128.25  # value * 2^(9 - 1)
