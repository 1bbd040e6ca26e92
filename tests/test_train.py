"""Real trainings on CALQ_output.csv: loss falls, artifacts are complete, runs resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import CALQ, ROOT

from ecqae import artifacts, cli, data, model, train
from ecqae.errors import EcqaeError

# Same configuration as the calq_run fixture, spelled as command-line flags.
FIXTURE_FLAGS = ["--data", str(CALQ), "--eta", "1.6:2.9", "--wafers", "0", "--seed", "1", "--epochs", "6",
                 "--batch-size", "256"]  # fmt: skip


def _weights(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        f["model_weights"].visititems(
            lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
        )
    return out


def test_training_loss_decreases_and_switches_loss(calq_run):
    m = json.loads((calq_run / "metrics.json").read_text())
    hist = m["history"]
    assert [h["stage"] for h in hist] == ["mse"] * 2 + ["telescope"] * 4
    tele = [h for h in hist if h["stage"] == "telescope"]
    assert tele[-1]["train_loss"] < tele[0]["train_loss"]
    assert tele[-1]["val_telescope"] < hist[0]["val_telescope"]
    assert 0 < m["final"]["test"]["telescope"] < hist[0]["val_telescope"]


def test_run_directory_is_complete(calq_run):
    done = artifacts.read_complete(calq_run)
    assert done is not None and set(done["files"]) == set(train.RUN_FILES)
    for name, digest in done["files"].items():
        assert artifacts.sha256_file(calq_run / name) == digest
    assert (calq_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = train.load_run(calq_run)
    assert run.run_id == done["run_id"] and run.config.train.epochs == 6
    assert len(run.test_wafers()) == 908
    cfg = json.loads((calq_run / "config.json").read_text())
    assert cfg["stack"]["qkeras"] == "0.9.0" and cfg["data"]["test"] == 908


def test_saved_encoder_reloads_identically(calq_run):
    run = train.load_run(calq_run)
    images = data.prepare(run.test_wafers()).images
    from_file = model.encode(model.load_model(calq_run / "encoder.h5"), images)
    inside_cae = model.encode(run.cae().get_layer("encoder"), images)
    np.testing.assert_array_equal(from_file, inside_cae)
    assert np.unique(from_file).size > 4  # a trained encoder, not a constant


def test_complete_run_is_not_retrained_and_other_config_refused(calq_run, capsys):
    assert cli.main(["train", *FIXTURE_FLAGS, "--out", str(calq_run)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert cli.main(["train", *FIXTURE_FLAGS[:-4], "--epochs", "7", "--batch-size", "256", "--out", str(calq_run)]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_sigkill_then_resume_matches_uninterrupted_run(calq_run, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ecqae", "train", *FIXTURE_FLAGS, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["next_epoch"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / artifacts.COMPLETE).exists()
    with pytest.raises(EcqaeError, match="not complete"):
        train.load_run(out)

    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint after epoch" in resumed.stdout
    for name in ("encoder.h5", "decoder.h5", "cae.h5"):
        a, b = _weights(calq_run / name), _weights(out / name)
        assert a.keys() == b.keys() and a
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
    assert json.loads((out / "config.json").read_text())["run_id"] == train.load_run(calq_run).run_id


def test_tampered_run_is_refused(calq_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(calq_run, copy)
    raw = bytearray((copy / "encoder.h5").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (copy / "encoder.h5").write_bytes(bytes(raw))
    with pytest.raises(EcqaeError, match="encoder.h5: missing or changed"):
        train.load_run(copy)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/wafers.csv", "--eta", "2"], "wafers.csv: file not found"),
        (["--data", str(CALQ)], "no 'eta' column"),
        (["--data", str(CALQ), "--eta", "2", "--elinks", "1"], "elinks must be an integer in 2..14"),
        (["--data", str(CALQ), "--eta", "3:2"], "LO <= HI"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert cli.main(["train", *args, "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ecqae: error:") and message in err and "\n" not in err
    assert not (tmp_path / "r" / artifacts.COMPLETE).exists()


def test_yaml_config_unknown_key_and_malformed(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("train:\n  epoch: 3\n")
    assert cli.main(["train", "--config", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "a.yaml: train: unknown key(s) epoch" in capsys.readouterr().err
    (tmp_path / "b.yaml").write_text("train: [1,\n")
    assert cli.main(["train", "--config", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "b.yaml: malformed YAML" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("train:\n  epochs: many\n")
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "c.yaml: train.epochs: expected an integer" in capsys.readouterr().err
