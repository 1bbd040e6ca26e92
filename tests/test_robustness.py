"""Hostile inputs and odd wafers: clear one-line errors, correct handling, never NaN."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import CALQ, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ecqae import chip, config, data, model
from ecqae.errors import EcqaeError

HEADER = ",".join(f"CALQ_{i}" for i in range(48))


def _csv(tmp_path, rows: list[str], name: str = "w.csv", header: str = HEADER):
    p = tmp_path / name
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


@pytest.mark.parametrize(
    "cells, message",
    [
        (["inf"] + ["1"] * 47, "CALQ_0: inf is not a finite charge"),
        (["-inf"] + ["1"] * 47, "CALQ_0"),
        (["1e3"] + ["1"] * 47, None),  # scientific notation of an integer is an integer
        (["", *["1"] * 47], "row 2"),
    ],
)
def test_odd_cells(tmp_path, cells, message):
    p = _csv(tmp_path, [",".join(cells)])
    if message is None:
        assert data.read_csv(p, eta="2").charges[0, 0] == 1000
    else:
        with pytest.raises(EcqaeError, match=message):
            data.read_csv(p, eta="2")


def test_tab_and_whitespace_separated(tmp_path):
    for sep in ("\t", " "):
        p = _csv(tmp_path, [sep.join(["2"] * 48)], header=HEADER.replace(",", sep), name=f"w{ord(sep)}.csv")
        assert data.read_csv(p, eta="2").charges.sum() == 96


def test_windows_line_endings_and_bom(tmp_path):
    p = tmp_path / "win.csv"
    p.write_bytes(("\ufeff" + HEADER + "\r\n" + ",".join(["1"] * 48) + "\r\n").encode())
    assert data.read_csv(p, eta="2").charges.sum() == 48


def test_corrupt_gzip_and_binary_and_directory(tmp_path):
    good = gzip.compress((HEADER + "\n" + ",".join(["1"] * 48) + "\n").encode() * 1)
    (tmp_path / "cut.csv.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(EcqaeError, match="cut.csv.gz"):
        data.read_csv(tmp_path / "cut.csv.gz", eta="2")
    (tmp_path / "bin.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(EcqaeError, match="bin.csv"):
        data.read_csv(tmp_path / "bin.csv", eta="2")
    with pytest.raises(EcqaeError, match="is a directory"):
        data.read_csv(tmp_path, eta="2")


def test_large_file_is_streamed_when_fewer_rows_are_asked(tmp_path):
    # 200,000 good rows then a broken one: asking for 1,000 rows never reads that far.
    row = ",".join(["3"] * 48)
    p = tmp_path / "big.csv"
    with open(p, "w") as f:
        f.write(HEADER + "\n")
        f.write((row + "\n") * 200_000)
        f.write("broken\n")
    w = data.read_csv(p, eta="2", max_rows=1000)
    assert len(w) == 1000
    with pytest.raises(EcqaeError, match="row 200002"):
        data.read_csv(p, eta="2")


def test_eta_column_with_nan(tmp_path):
    p = _csv(tmp_path, [",".join(["1"] * 48) + ",nan"], header=HEADER + ",eta")
    with pytest.raises(EcqaeError, match="eta is not finite"):
        data.read_csv(p)


def test_edge_wafers_never_produce_nan():
    q = np.zeros((6, 48), dtype=np.int64)
    q[1, 0] = 1  # smallest non-zero wafer
    q[2, :] = chip.CHARGE_MAX  # saturating sum
    q[3, 47] = chip.CHARGE_MAX  # single hit at the 22-bit limit
    q[4, :] = 1
    q[5, ::2] = 12345
    eta = np.array([1.5, 3.0, 0.0, -2.2, 4.5, 2.2], dtype=np.float32)  # includes values outside the endcap
    p = data.prepare(data.Wafers(q.astype(np.int32), eta))
    for arr in (p.images, p.target, p.cond):
        assert np.all(np.isfinite(arr))
    assert np.all(p.target[0] == 0) and p.sum_word[0] == 0
    enc, dec, cae = model.build_cae(config.ModelConfig())
    out = cae.predict([p.images, p.cond], verbose=0)
    assert np.all(np.isfinite(out)) and np.all(out >= 0)
    recon = out * p.sum_decoded[:, None]
    assert np.all(np.isfinite(recon)) and recon[0].sum() == 0


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--data", "/nonexistent.csv", "--eta", "2"],
        ["train", "--data", str(CALQ)],
        ["train", "--config", "/nonexistent.yaml"],
    ],
)
def test_cli_errors_are_one_line_without_traceback(tmp_path, args):
    cmd = [sys.executable, "-m", "ecqae", *args, "--out", str(tmp_path / "r")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ecqae: error:"), r.stderr
    assert "Traceback" not in r.stderr


def test_debug_shows_the_traceback(tmp_path):
    args = ["train", "--data", "/nonexistent.csv", "--eta", "2", "--debug", "--out", str(tmp_path / "r")]
    r = subprocess.run([sys.executable, "-m", "ecqae", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


# ----------------------------------------------------------------------------- through the firmware


@pytest.fixture(scope="module")
def chain9(calq_run, hls9):
    """QKeras, C simulation and golden model of the 9-bit run, plus its decoder."""
    from ecqae import firmware, train, verify

    run = train.load_run(calq_run)
    project = firmware.open_project(hls9["econt_asic"])
    impls = verify.implementations(run.encoder(), run.config.model.quant, project)
    return run, impls


wafer_rows = st.integers(min_value=1, max_value=24).flatmap(
    lambda n: hnp.arrays(
        np.int64,
        (n, 48),
        elements=st.one_of(
            st.just(0),
            st.integers(0, 64),
            st.integers(0, chip.CHARGE_MAX),
            st.just(chip.CHARGE_MAX),
        ),
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(charges=wafer_rows, eta=st.floats(-3.5, 3.5, allow_nan=False), sparsity=st.floats(0.0, 1.0))
def test_random_wafers_through_the_whole_chain(chain9, charges, eta, sparsity):
    """Any wafer: no NaN anywhere, bit-exact latents in all three implementations, outputs in range."""
    run, impls = chain9
    keep = np.random.default_rng(charges.size).random(charges.shape) >= sparsity
    charges = charges * keep
    wafers = data.Wafers(charges.astype(np.int32), np.full(len(charges), eta, dtype=np.float32))
    prep = data.prepare(wafers)
    for arr in (prep.images, prep.target, prep.cond):
        assert np.all(np.isfinite(arr))
    assert np.all((prep.images >= 0) & (prep.images <= 1))
    codes = {name: fn(charges) for name, fn in impls.items()}
    bits = run.config.model.latent_bits
    for name, c in codes.items():
        np.testing.assert_array_equal(c, codes["qkeras"], err_msg=name)
        assert c.min() >= 0 and c.max() < 2**bits
    latent = codes["csim"] / 2.0 ** (bits - 1)
    frac = model.decode(run.decoder(), latent.astype(np.float32), prep.cond)
    assert np.all(np.isfinite(frac)) and np.all(frac >= 0)
    np.testing.assert_allclose(frac.sum(axis=1), 1.0, rtol=1e-4)
    recon = frac * prep.sum_decoded[:, None]
    assert np.all(np.isfinite(recon)) and np.all(recon <= 2 * chip.CHARGE_MAX)


def _hls(out, run, config, **kw):
    cmd = [sys.executable, "-m", "ecqae", "hls", "--run", str(run), "--out", str(out), str(config)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_killed_hls_leaves_nothing_trusted_and_the_rerun_rebuilds(calq_run, tmp_path):
    from conftest import CONFIGS

    from ecqae import artifacts, firmware

    out = tmp_path / "hls"
    proc = _hls(out, calq_run, CONFIGS[0])
    project = out / "econt_asic"
    deadline = time.monotonic() + 300
    # kill once anything of the project exists on disk: the temporary build or the renamed project
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(".econt_asic") and p.suffix != ".lock" for p in out.glob(".*")) or project.exists():
            time.sleep(1.0)
            break
        time.sleep(0.05)
    assert proc.poll() is None, "conversion finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert artifacts.read_complete(project) is None
    with pytest.raises(EcqaeError, match="no HLS project|incomplete"):
        firmware.open_project(project)
    rerun = _hls(out, calq_run, CONFIGS[0])
    assert rerun.wait(timeout=600) == 0, rerun.stdout.read()
    assert firmware.open_project(project).csim().run(np.zeros((1, 9, 9, 1))).shape == (1, 16)


def test_two_concurrent_hls_runs_do_not_corrupt_each_other(calq_run, tmp_path):
    from conftest import CONFIGS

    from ecqae import firmware

    out = tmp_path / "hls"
    procs = [_hls(out, calq_run, CONFIGS[0]) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=900) == 0, p.stdout.read()
    project = firmware.open_project(out / "econt_asic")
    assert project.csim().run(np.zeros((2, 9, 9, 1))).shape == (2, 16)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == []


# ----------------------------------------------------------------------------- training inputs and outputs


def test_text_columns_we_do_not_use_are_ignored(tmp_path):
    header = "sample," + HEADER + ",tag,eta"
    p = _csv(tmp_path, ["ttbar," + ",".join(["2"] * 48) + ",evt-17,2.4"], header=header)
    w = data.read_csv(p)
    assert w.charges.sum() == 96 and w.eta[0] == np.float32(2.4)


def test_eta_outside_the_endcap_warns(capsys):
    from ecqae import train

    cfg = config.DataConfig(source=str(CALQ), n_wafers=200, eta="4.5")
    train.load_splits(cfg, log=lambda _m: None)
    err = capsys.readouterr().err
    assert "ecqae: warning:" in err and "200 wafers have |eta| outside the endcap" in err


@pytest.mark.parametrize("out", ["", "."])
def test_out_must_be_a_run_directory(out, capsys):
    from ecqae import cli

    assert cli.main(["train", "--data", str(CALQ), "--eta", "2", "--epochs", "1", "--out", out]) == 2
    assert "--out must name a run directory" in capsys.readouterr().err


def test_foreign_directory_is_not_overwritten(tmp_path, capsys):
    from ecqae import cli

    (tmp_path / "notes.txt").write_text("keep me")
    assert cli.main(["train", "--data", str(CALQ), "--eta", "2", "--epochs", "1", "--out", str(tmp_path)]) == 2
    assert "not a run directory (holds notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_second_training_into_the_same_directory_is_refused(tmp_path, capsys):
    import fcntl

    from ecqae import cli, train

    out = tmp_path / "run"
    out.mkdir()
    with open(out / train.LOCK, "w") as held:  # a training in progress holds this lock
        fcntl.flock(held, fcntl.LOCK_EX)
        assert cli.main(["train", "--data", str(CALQ), "--eta", "2", "--epochs", "1", "--out", str(out)]) == 2
    assert "another training is writing this run directory" in capsys.readouterr().err
