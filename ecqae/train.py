"""Training stage: data -> conditional autoencoder -> a self-contained run directory.

MSE for the first third of the epochs (pre-training), then the telescope
loss; early stopping watches the telescope validation loss. Every epoch ends
with a whole checkpoint (weights, optimizer state, history, RNG position all
derive from the epoch number), so a killed run resumes where it stopped and
finishes with the same weights as a run that was never interrupted.

Run directory (trusted only once ``COMPLETE`` exists, written last):
  config.json     resolved RunConfig, run id, data description, package versions
  encoder.h5      QKeras encoder (the firmware's input)
  decoder.h5      float decoder
  cae.h5          the full model
  test_split.npz  test wafers (charges, eta) for firmware verification
  metrics.json    per-epoch losses per stage, final validation/test losses
  loss.png        loss curves with the MSE -> telescope switch marked
  checkpoint/     last complete epoch (for resuming)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import artifacts, chip, data, losses
from . import model as mdl
from .config import DataConfig, RunConfig, from_dict, to_dict
from .errors import EcqaeError

Log = Callable[[str], None]
RUN_FILES = ("config.json", "encoder.h5", "decoder.h5", "cae.h5", "test_split.npz", "metrics.json", "loss.png")
STACK = ("tensorflow", "keras", "qkeras", "hls4ml", "numpy")
MIN_WAFERS = 20
ETA_RANGE = (chip.ETA_MIN, chip.ETA_MAX)
LOCK = ".lock"


def _warn(message: str) -> None:
    print(f"ecqae: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """One training per run directory at a time; a second one stops with a clear error."""
    f = open(out / LOCK, "w")  # held for the whole training
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise EcqaeError(
            f"{out}: another training is writing this run directory; wait for it or use another --out"
        ) from None
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _prepare_out(out: Path) -> None:
    """Refuse output paths that would scatter a run over something else."""
    if str(out) in ("", "."):
        raise EcqaeError("--out must name a run directory (e.g. runs/default), not the current directory")
    if out.exists() and not out.is_dir():
        raise EcqaeError(f"{out}: exists and is not a directory")
    if out.is_dir():
        ours = set(RUN_FILES) | {artifacts.COMPLETE, "checkpoint", LOCK, "evaluation"}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
        if foreign:
            raise EcqaeError(f"{out}: not a run directory (holds {', '.join(foreign[:3])}); choose an empty --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EcqaeError(f"{out}: cannot create the run directory ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise EcqaeError(f"{out}: run directory is not writable")


def stack_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in STACK:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _fingerprint(cfg: RunConfig) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


@dataclass
class Splits:
    train: data.Prepared
    val: data.Prepared
    test: data.Prepared
    test_wafers: data.Wafers
    source: str
    n_total: int
    n_empty_dropped: int
    data_sha256: str


def load_splits(cfg: DataConfig, log: Log = print) -> Splits:
    """Load wafers, drop empty ones (the chip sends nothing for them), split by seed."""
    wafers = data.load(cfg.source, cfg.n_wafers, cfg.eta, cfg.seed)
    empty = wafers.charges.sum(axis=1) == 0
    if empty.any():
        _warn(f"{wafers.source}: dropping {int(empty.sum())} all-zero wafers (the chip sends nothing for them)")
    outside = (np.abs(wafers.eta) < ETA_RANGE[0]) | (np.abs(wafers.eta) > ETA_RANGE[1])
    if outside.any():
        _warn(
            f"{wafers.source}: {int(outside.sum())} wafers have |eta| outside the endcap "
            f"{ETA_RANGE[0]}-{ETA_RANGE[1]}; the decoder's eta condition extrapolates there"
        )
        wafers = wafers.take(np.flatnonzero(~empty))
    if len(wafers) < MIN_WAFERS:
        raise EcqaeError(f"{cfg.source}: {len(wafers)} non-empty wafers, at least {MIN_WAFERS} needed to train")
    digest = hashlib.sha256(wafers.charges.tobytes() + wafers.eta.tobytes()).hexdigest()
    tr, va, te = data.split_indices(len(wafers), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    test = wafers.take(te)
    return Splits(
        train=data.prepare(wafers.take(tr)),
        val=data.prepare(wafers.take(va)),
        test=data.prepare(test),
        test_wafers=test,
        source=wafers.source,
        n_total=int(empty.size),
        n_empty_dropped=int(empty.sum()),
        data_sha256=digest,
    )


class _Progress:
    """Within-epoch progress on a terminal (one rewritten line); silent in logs and CI."""

    def __init__(self, total_batches: int) -> None:
        self.total = total_batches
        self.enabled = sys.stderr.isatty()

    def keras_callback(self) -> Any:
        from tensorflow import keras

        progress = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
                if progress.enabled and (batch % 20 == 0 or batch + 1 == progress.total):
                    loss = (logs or {}).get("loss", float("nan"))
                    print(f"\r  batch {batch + 1}/{progress.total} loss {loss:.5g}", end="", file=sys.stderr)

            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                if progress.enabled:
                    print("\r" + " " * 60 + "\r", end="", file=sys.stderr)

        return Callback()


def _val_losses(cae: Any, split: data.Prepared, batch_size: int) -> dict[str, float]:
    pred = cae.predict([split.images, split.cond], batch_size=max(batch_size, 4096), verbose=0)
    return {
        "mse": float(np.mean((pred.astype(np.float64) - split.target) ** 2)),
        "telescope": float(np.mean(losses.telescope_numpy(split.target, pred))),
    }


def _save_checkpoint(ckpt: Path, cae: Any, best_weights: list[np.ndarray] | None, opt: Any, state: dict) -> None:
    """The whole checkpoint directory is swapped in at once: never a mix of two epochs."""
    with artifacts.atomic_dir(ckpt) as tmp:
        cae.save_weights(tmp / "weights.h5")
        np.savez(tmp / "optimizer.npz", *[v.numpy() for v in opt.variables])
        if best_weights is not None:
            np.savez(tmp / "best.npz", *best_weights)
        (tmp / "state.json").write_text(json.dumps(state, indent=1))


def _load_checkpoint(ckpt: Path, cae: Any, opt: Any) -> tuple[dict, list[np.ndarray] | None]:
    try:
        state = json.loads((ckpt / "state.json").read_text())
        cae.load_weights(ckpt / "weights.h5")
        opt.build(cae.trainable_variables)
        with np.load(ckpt / "optimizer.npz") as z:
            saved = [z[f"arr_{i}"] for i in range(len(z.files))]
        if len(saved) != len(opt.variables):
            raise ValueError("optimizer state does not match the model")
        for var, value in zip(opt.variables, saved, strict=True):
            var.assign(value)
        best = None
        if (ckpt / "best.npz").is_file():
            with np.load(ckpt / "best.npz") as z:
                best = [z[f"arr_{i}"] for i in range(len(z.files))]
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise EcqaeError(f"{ckpt}: unreadable checkpoint ({exc}); remove it or use --force") from None
    return state, best


def plot_losses(history: list[dict], mse_epochs: int, path: Path) -> None:
    """Loss curves per stage; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ep = np.array([h["epoch"] for h in history]) + 1
    for ax, key, title in ((axes[0], "mse", "MSE"), (axes[1], "telescope", "telescope loss")):
        train_vals = [h["train_loss"] if h["stage"] == key else np.nan for h in history]
        ax.plot(ep, train_vals, "o-", label="train (this stage)")
        ax.plot(ep, [h[f"val_{key}"] for h in history], "s--", label="validation")
        if 0 < mse_epochs < len(history) + 1:
            ax.axvline(mse_epochs + 0.5, color="grey", ls=":", label="MSE -> telescope")
        ax.set_xlabel("epoch")
        ax.set_ylabel(title)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    artifacts.write_with(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


def train(cfg: RunConfig, out: str | Path, force: bool = False, log: Log = print) -> Run:
    """Train (or resume, or skip if already complete) and write the run directory."""
    out = Path(out)
    _prepare_out(out)
    with _run_lock(out):
        return _train_locked(cfg, out, force, log)


def _train_locked(cfg: RunConfig, out: Path, force: bool, log: Log) -> Run:
    fp = _fingerprint(cfg)
    done = artifacts.read_complete(out)
    if done is not None and not force:
        if done.get("fingerprint") == fp:
            log(f"{out}: already complete for this configuration (run {done.get('run_id')}); --force retrains")
            return load_run(out)
        raise EcqaeError(
            f"{out}: holds a complete run (id {done.get('run_id')}) of another configuration; train into another "
            "directory (make train RUN=runs/NAME, or --out) or overwrite it (make train TRAIN_ARGS=--force)"
        )

    t_load = time.perf_counter()
    splits = load_splits(cfg.data, log)
    log(
        f"data: {splits.source}: {splits.n_total} wafers -> train {len(splits.train)}, "
        f"val {len(splits.val)}, test {len(splits.test)} ({time.perf_counter() - t_load:.1f} s)"
    )
    run_id = hashlib.sha256((fp + splits.data_sha256).encode()).hexdigest()[:12]

    tc = cfg.train
    mdl.set_seed(tc.seed)
    from tensorflow import keras

    encoder, decoder, cae = mdl.build_cae(cfg.model)
    opt = keras.optimizers.Adam(learning_rate=tc.learning_rate)
    ckpt = out / "checkpoint"
    (out / artifacts.COMPLETE).unlink(missing_ok=True)  # this directory is being rewritten
    if force and ckpt.exists():
        shutil.rmtree(ckpt)

    state: dict[str, Any] = {"fingerprint": fp, "next_epoch": 0, "history": [], "best_val": None, "wait": 0}
    best_weights: list[np.ndarray] | None = None
    if (ckpt / "state.json").is_file():
        saved, best_saved = _load_checkpoint(ckpt, cae, opt)
        if saved.get("fingerprint") != fp:
            raise EcqaeError(f"{ckpt}: checkpoint of another configuration; choose a new --out or use --force")
        state, best_weights = saved, best_saved
        log(f"resuming from checkpoint after epoch {state['next_epoch']}")

    n = len(splits.train)
    batches = -(-n // tc.batch_size)
    log(
        f"training run {run_id}: {cfg.model.latent_bits}-bit latents ({cfg.model.elinks} e-links), "
        f"{'conditional' if cfg.model.conditional else 'plain'} decoder, {tc.epochs} epoch(s): "
        f"MSE for {tc.mse_epochs}, then telescope; batch {tc.batch_size}"
    )
    compiled_stage = None
    stopped_early = state.get("stopped_early", False)
    try:
        for epoch in range(state["next_epoch"], tc.epochs):
            if stopped_early:
                break
            stage = "mse" if epoch < tc.mse_epochs else "telescope"
            if stage != compiled_stage:
                if epoch == tc.mse_epochs and epoch > 0:
                    log(f"epoch {epoch + 1}: switching loss MSE -> telescope")
                cae.compile(optimizer=opt, loss=losses.LOSSES[stage])
                compiled_stage = stage
            perm = np.random.default_rng([tc.seed, epoch]).permutation(n)
            t0 = time.perf_counter()
            hist = cae.fit(
                [splits.train.images[perm], splits.train.cond[perm]],
                splits.train.target[perm],
                batch_size=tc.batch_size,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=[_Progress(batches).keras_callback()],
            )
            seconds = time.perf_counter() - t0
            train_loss = float(hist.history["loss"][0])
            if not np.isfinite(train_loss):
                raise EcqaeError(f"epoch {epoch + 1}: training loss is {train_loss}; lower the learning rate")
            val = _val_losses(cae, splits.val, tc.batch_size)
            note = ""
            if stage == "telescope":
                if state["best_val"] is None or val["telescope"] < state["best_val"]:
                    state["best_val"], state["wait"], state["best_epoch"] = val["telescope"], 0, epoch
                    best_weights = [w.copy() for w in cae.get_weights()]
                    note = " *best"
                else:
                    state["wait"] += 1
                    if state["wait"] >= tc.patience:
                        stopped_early = True
                        note = f" (no improvement for {tc.patience} epochs: stopping)"
            state["history"].append(
                {
                    "epoch": epoch,
                    "stage": stage,
                    "train_loss": train_loss,
                    "val_mse": val["mse"],
                    "val_telescope": val["telescope"],
                    "seconds": seconds,
                    "wafers_per_s": n / seconds,
                }
            )
            state["next_epoch"] = epoch + 1
            state["stopped_early"] = stopped_early
            _save_checkpoint(ckpt, cae, best_weights, opt, state)
            log(
                f"epoch {epoch + 1:3d}/{tc.epochs} [{stage:9s}] loss {train_loss:.4e}  "
                f"val mse {val['mse']:.4e} telescope {val['telescope']:.4e}  "
                f"{seconds:.1f} s, {n / seconds:,.0f} wafers/s{note}"
            )
    except KeyboardInterrupt:
        log(f"interrupted: the last complete epoch is checkpointed in {ckpt}; rerun the same command to resume")
        raise

    if best_weights is not None:
        cae.set_weights(best_weights)
    final = {
        "val": _val_losses(cae, splits.val, tc.batch_size),
        "test": _val_losses(cae, splits.test, tc.batch_size),
        "best_epoch": state.get("best_epoch"),
        "epochs_run": state["next_epoch"],
        "stopped_early": stopped_early,
    }
    log(f"test split: telescope {final['test']['telescope']:.4e}, mse {final['test']['mse']:.4e}")
    _write_run(out, cfg, run_id, splits, encoder, decoder, cae, state["history"], final)
    log(f"wrote {out}")
    return load_run(out)


def _write_run(
    out: Path,
    cfg: RunConfig,
    run_id: str,
    splits: Splits,
    encoder: Any,
    decoder: Any,
    cae: Any,
    history: list[dict],
    final: dict,
) -> None:
    for name, m in (("encoder.h5", encoder), ("decoder.h5", decoder), ("cae.h5", cae)):
        artifacts.write_with(out / name, lambda p, m=m: m.save(p, save_format="h5", include_optimizer=False))
    data.save_wafers(out / "test_split.npz", splits.test_wafers)
    artifacts.write_json(
        out / "config.json",
        {
            "run_id": run_id,
            "config": to_dict(cfg),
            "data": {
                "source": splits.source,
                "sha256": splits.data_sha256,
                "wafers": splits.n_total,
                "empty_dropped": splits.n_empty_dropped,
                "train": len(splits.train),
                "val": len(splits.val),
                "test": len(splits.test),
            },
            "stack": stack_versions(),
        },
    )
    artifacts.write_json(out / "metrics.json", {"run_id": run_id, "history": history, "final": final})
    plot_losses(history, cfg.train.mse_epochs, out / "loss.png")
    artifacts.mark_complete(out, list(RUN_FILES), {"run_id": run_id, "fingerprint": _fingerprint(cfg)})


@dataclass
class Run:
    """A complete run directory; models load lazily and the encoder is contract-checked."""

    path: Path
    run_id: str
    config: RunConfig

    @cached_property
    def _encoder(self) -> Any:
        enc = mdl.load_model(self.path / "encoder.h5")
        mdl.check_encoder(enc, str(self.path / "encoder.h5"))
        return enc

    def encoder(self) -> Any:
        return self._encoder

    @cached_property
    def _decoder(self) -> Any:
        return mdl.load_model(self.path / "decoder.h5")

    def decoder(self) -> Any:
        return self._decoder

    def cae(self) -> Any:
        return mdl.load_model(self.path / "cae.h5")

    def test_wafers(self) -> data.Wafers:
        return data.load_wafers(self.path / "test_split.npz")

    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())


def load_run(path: str | Path) -> Run:
    """Open a finished run; refuse missing, unfinished or tampered directories."""
    p = Path(path)
    if not p.is_dir():
        raise EcqaeError(f"{p}: no such run directory (train first: make train)")
    artifacts.verified_complete(
        p, "run is not complete (interrupted?); rerun the training to resume it", "the run completed"
    )
    try:
        record = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EcqaeError(f"{p / 'config.json'}: unreadable ({exc})") from None
    cfg = from_dict(RunConfig, record["config"], str(p / "config.json"))
    return Run(path=p, run_id=record["run_id"], config=cfg)
