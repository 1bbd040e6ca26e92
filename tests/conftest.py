"""Shared fixtures: real wafer files from ../shared and small real trainings, made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ECQAE_SHARED", ROOT.parent / "shared")) / "data" / "hgcal-wafers"
CALQ = SHARED / "CALQ_output.csv"
TTBAR = SHARED / "ttbar_0PU.csv"
TC_COORDS = SHARED / "tc_coords.csv"
SUPERCELLS = SHARED / "telescope_supercells.csv"
CONFIGS = [ROOT / "firmware_configs" / "econt_asic.yaml", ROOT / "firmware_configs" / "fpga_vitis.yaml"]


def wafer(dtype: type = np.float64, **charges: float) -> np.ndarray:
    """One (1, 48) hand-made wafer from keyword pairs like t0=10, t5=3."""
    w = np.zeros((1, 48), dtype=dtype)
    for key, value in charges.items():
        w[0, int(key[1:])] = value
    return w


def _train_small(tmp_path_factory: pytest.TempPathFactory, name: str, elinks: int, conditional: bool = True) -> Path:
    """A short real training on CALQ_output.csv (all 6,050 wafers)."""
    from ecqae import config, train

    cfg = config.RunConfig(
        data=config.DataConfig(source=str(CALQ), n_wafers=0, eta="1.6:2.9", seed=1),
        model=config.ModelConfig(elinks=elinks, conditional=conditional),
        train=config.TrainConfig(epochs=6, batch_size=256, seed=1),
    )
    out = tmp_path_factory.mktemp(name) / "run"
    train.train(cfg, out, log=lambda _msg: None)
    return out


@pytest.fixture(scope="session")
def calq_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of a conditional model with 9-bit latents (5 e-links)."""
    return _train_small(tmp_path_factory, "calq9", elinks=5)


@pytest.fixture(scope="session")
def calq_run_3bit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of a conditional model with 3-bit latents (2 e-links)."""
    return _train_small(tmp_path_factory, "calq3", elinks=2)


@pytest.fixture(scope="session")
def calq_run_plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of the plain (unconditioned) ablation model, 9-bit latents."""
    return _train_small(tmp_path_factory, "calq9plain", elinks=5, conditional=False)


_PROJECTS: dict[Path, dict[str, Path]] = {}


def projects_for(run: Path, base: Path) -> dict[str, Path]:
    """Both shipped firmware configs converted and compiled for ``run``, once per session."""
    from ecqae import firmware

    if run not in _PROJECTS:
        out = base / f"hls-{run.parent.name}"
        paths = firmware.convert_all(run, CONFIGS, out, log=lambda _msg: None)
        _PROJECTS[run] = {p.name: p for p in paths}
    return _PROJECTS[run]


@pytest.fixture(scope="session")
def hls9(calq_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Compiled Catapult and Vitis projects of the 9-bit model, by config name."""
    return projects_for(calq_run, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def hls3(calq_run_3bit: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Compiled Catapult and Vitis projects of the 3-bit model, by config name."""
    return projects_for(calq_run_3bit, tmp_path_factory.getbasetemp())
