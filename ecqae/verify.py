"""Verification stage: the C simulation must give, bit for bit, the latents QKeras gives.

For every firmware config, the compiled C simulation of ``hls/<name>/`` and the
QKeras encoder (and the integer golden model, ecqae/golden.py) encode the same
wafers: the run's saved test split, the corner cases below and any extra
wafers the user gives. Every latent is compared as the integer code the chip
sends. A mismatch is reported with the first few (wafer, latent, QKeras, C-sim)
values and the first layer where an hls4ml trace departs from QKeras. The test
wafers are then decoded from both sets of latents and the reconstructions
compared. ``hls/verify.json`` keeps the numbers.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import artifacts, chip, data, firmware
from .config import FirmwareConfig, QuantConfig
from .errors import EcqaeError

Log = Callable[[str], None]
Implementation = Callable[[np.ndarray], np.ndarray]  # charges (N, 48) -> latent codes (N, 16)

CORNER_ETA = 2.25  # corner cases sit mid-endcap; eta reaches only the decoder, never the encoder
RANDOM_CORNERS = 1000
SHOW_MISMATCHES = 5
TRACE_WAFERS = 3
REFERENCE = "qkeras"


def corner_cases(seed: int = 0) -> data.Wafers:
    """Wafers at the edges of the encoder's input space (all at eta = CORNER_ETA).

    - all charge in one TC, for every TC: charge 1 (the smallest non-zero
      wafer) and charge 2^22 - 1 (the 22-bit limit); input 1.0 at that TC;
    - the smallest non-zero input, 1/256, at every TC (that TC 1, its neighbour 255);
    - uniform wafers: every TC 1, 35 (1 MIP_T), 4096, and 87,381 (sum at the 22-bit limit);
    - every TC at the 22-bit limit (the sum saturates: every input 1.0);
    - the empty wafer (the chip sends nothing, but the encoder must still agree);
    - random full-range inputs on the grid: half of them every TC uniform in
      0..2^22-1 (saturated sums, inputs across [0, 1]), half with 1..48 hit
      TCs of log-uniform charge 1..2^22-1.
    """
    rng = np.random.default_rng([seed, 0xC0])
    n = chip.N_TC
    rows: list[np.ndarray] = []
    eye = np.eye(n, dtype=np.int64)
    rows += [eye * 1, eye * chip.CHARGE_MAX]
    smallest = eye * 1 + np.roll(eye, 1, axis=1) * 255
    rows.append(smallest)
    for q in (1, chip.MIP_T, 4096, chip.CHARGE_MAX // n):
        rows.append(np.full((1, n), q, dtype=np.int64))
    rows.append(np.full((1, n), chip.CHARGE_MAX, dtype=np.int64))
    rows.append(np.zeros((1, n), dtype=np.int64))
    half = RANDOM_CORNERS // 2
    rows.append(rng.integers(0, chip.CHARGE_MAX + 1, (half, n)))
    sparse = np.exp(rng.uniform(0, np.log(chip.CHARGE_MAX), (RANDOM_CORNERS - half, n))).astype(np.int64)
    hits = rng.integers(1, n + 1, RANDOM_CORNERS - half)
    keep = rng.random((RANDOM_CORNERS - half, n)).argsort(axis=1) < hits[:, None]
    rows.append(np.where(keep, np.clip(sparse, 1, chip.CHARGE_MAX), 0))
    charges = np.concatenate(rows).astype(np.int32)
    return data.Wafers(charges, np.full(len(charges), CORNER_ETA, dtype=np.float32), "corner cases")


def implementations(encoder: Any, quant: QuantConfig, project: firmware.Project) -> dict[str, Implementation]:
    """Name -> charges-to-latent-codes; QKeras is the reference the others are compared to."""
    from . import golden
    from . import model as mdl

    csim = project.csim()
    integer = golden.IntegerEncoder.from_keras(encoder)

    def qkeras(charges: np.ndarray) -> np.ndarray:
        return firmware.latent_codes(mdl.encode(encoder, firmware.encoder_images(charges)), quant)

    def c_sim(charges: np.ndarray) -> np.ndarray:
        return firmware.latent_codes(csim.run(firmware.encoder_images(charges)), quant)

    def golden_model(charges: np.ndarray) -> np.ndarray:
        return np.asarray(integer.latent_codes(charges), dtype=np.int64)

    return {REFERENCE: qkeras, "csim": c_sim, "golden": golden_model}


def _concat(parts: list[tuple[str, data.Wafers]]) -> tuple[data.Wafers, list[tuple[str, int, int]]]:
    """One Wafers of all parts, plus (label, start, stop) to name where a wafer came from."""
    spans, start = [], 0
    for label, w in parts:
        spans.append((label, start, start + len(w)))
        start += len(w)
    charges = np.concatenate([w.charges for _, w in parts]).astype(np.int32)
    eta = np.concatenate([w.eta for _, w in parts]).astype(np.float32)
    return data.Wafers(charges, eta, "+".join(label for label, _ in parts)), spans


def _where(i: int, spans: list[tuple[str, int, int]]) -> str:
    for label, lo, hi in spans:
        if lo <= i < hi:
            return f"{label} #{i - lo}"
    return f"#{i}"


def _fmt_code(v: Any) -> str:
    f = float(v)
    return str(int(f)) if f == int(f) else f"{f:g} (off the latent grid)"


def first_divergence(
    encoder: Any,
    fw: FirmwareConfig,
    quant: QuantConfig,
    project: firmware.Project,
    charges: np.ndarray,
    workdir: Path,
    log: Log,
) -> dict[str, Any]:
    """The first layer where an hls4ml trace of these wafers departs from QKeras's layer outputs."""
    from tensorflow import keras

    images = firmware.encoder_images(charges)
    try:
        traces, defines = firmware.trace(encoder, fw, quant, images, workdir, log)
    except Exception as exc:  # a diagnostic: report, never mask the mismatch itself
        return {"layer": None, "note": f"trace unavailable ({str(exc).splitlines()[0] if str(exc) else exc})"}
    note = "" if defines == project.defines() else "traced rebuild's defines.h differs from the project's"
    names = firmware.role_names(encoder)
    order = [names[r] for r in ("conv2d", "conv_act", "dense", "latent")]
    probe = keras.Model(encoder.input, [encoder.get_layer(n).output for n in order])
    ref = [np.asarray(a, dtype=np.float64).reshape(len(images), -1) for a in probe.predict(images, verbose=0)]
    for name, q in zip(order, ref, strict=True):
        if name not in traces:
            continue
        diff = np.argwhere(traces[name] != q)
        if len(diff):
            w, k = diff[0]
            return {
                "layer": name,
                "index": int(k),
                "qkeras": float(q[w, k]),
                "csim": float(traces[name][w, k]),
                "traced": [n for n in order if n in traces],
                "note": note,
            }
    return {"layer": None, "traced": [n for n in order if n in traces], "note": note or "all traced layers agree"}


def verify_config(
    fw: FirmwareConfig,
    run: Any,
    project: firmware.Project,
    wafers: data.Wafers,
    spans: list[tuple[str, int, int]],
    n_test: int,
    workdir: Path,
    log: Log = print,
) -> dict[str, Any]:
    """Compare every implementation with QKeras on ``wafers``; the per-config report."""
    from . import model as mdl

    encoder = run.encoder()
    quant = mdl.check_encoder(encoder)
    impls = implementations(encoder, quant, project)
    n = len(wafers)
    codes: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    for name, fn in impls.items():
        t0 = time.perf_counter()
        codes[name] = fn(wafers.charges)
        timings[name] = time.perf_counter() - t0
        if codes[name].shape != (n, chip.N_LATENT):
            raise EcqaeError(f"{name}: returned shape {codes[name].shape}, expected ({n}, {chip.N_LATENT})")
    ref = codes[REFERENCE]
    report: dict[str, Any] = {
        "project": str(project.path),
        "backend": fw.backend,
        "wafers": n,
        "sources": {label: hi - lo for label, lo, hi in spans},
        "latents": int(ref.size),
        "compile_seconds": project.record.get("timings", {}).get("compile_seconds"),
        "wafers_per_s": {name: round(n / max(t, 1e-9), 1) for name, t in timings.items()},
        "compared": {},
        "ok": True,
    }
    compiled = report["compile_seconds"]
    log(
        f"{fw.name} ({fw.backend}, {project.record['hls_types']}, {project.path}"
        + (f", compiled in {compiled:.1f} s" if compiled is not None else "")
        + f"): {n:,} wafers ({', '.join(f'{hi - lo:,} {label}' for label, lo, hi in spans)}), "
        f"{ref.size:,} latents each"
    )
    for name in impls:
        if name == REFERENCE:
            continue
        diff = codes[name] != ref
        bad = int(diff.sum())
        entry: dict[str, Any] = {
            "latents": int(ref.size),
            "exact": int(ref.size - bad),
            "mismatches": bad,
            "mismatched_wafers": int(diff.any(axis=1).sum()),
        }
        log(
            f"  {name:6s} vs {REFERENCE}: {ref.size:,} latents compared, {ref.size - bad:,} exact, "
            f"{bad:,} mismatches ({n / timings[name]:,.0f} wafers/s)"
        )
        if bad:
            first = []
            for w, k in np.argwhere(diff)[:SHOW_MISMATCHES]:
                first.append(
                    {"wafer": int(w), "from": _where(int(w), spans), "latent": int(k), REFERENCE: ref[w, k].item()}
                    | {name: codes[name][w, k].item()}
                )
                log(
                    f"    wafer {w} ({_where(int(w), spans)}), latent {k}: {REFERENCE} {_fmt_code(ref[w, k])}, "
                    f"{name} {_fmt_code(codes[name][w, k])}"
                )
            entry["first"] = first
            report["ok"] = False
        report["compared"][name] = entry
    csim_bad = np.flatnonzero((codes["csim"] != ref).any(axis=1))
    if len(csim_bad):
        pick = csim_bad[:TRACE_WAFERS]
        log(f"  tracing wafers {', '.join(map(str, pick))} through every layer (hls4ml trace, one more compile)")
        div = first_divergence(encoder, fw, quant, project, wafers.charges[pick], workdir, log)
        report["divergence"] = div
        if div.get("layer"):
            log(
                f"  first divergence: layer '{div['layer']}' (output {div['index']}: QKeras {div['qkeras']:g}, "
                f"C-sim {div['csim']:g})" + (f"; {div['note']}" if div.get("note") else "")
            )
        else:
            log(f"  first divergence: not found in the traced layers ({div.get('note', '')})")
    report["reconstruction"] = _reconstruction(run, wafers, codes[REFERENCE], codes["csim"], quant, n_test, log)
    if not report["reconstruction"]["equal"]:
        report["ok"] = False
    log(f"  {fw.name}: {'PASS' if report['ok'] else 'FAIL'}")
    return report


def _reconstruction(
    run: Any, wafers: data.Wafers, ref: np.ndarray, csim: np.ndarray, quant: QuantConfig, n_test: int, log: Log
) -> dict[str, Any]:
    """Decode the test wafers from QKeras latents and from C-sim latents; equal reconstructions?"""
    from . import model as mdl

    sel = slice(0, n_test)
    prep = data.prepare(wafers.take(np.arange(n_test)))
    scale = float(2 ** (quant.latent_bits - quant.latent_integer))  # type: ignore[operator]
    decoder = run.decoder()
    a = mdl.decode(decoder, (np.asarray(ref[sel], dtype=np.float64) / scale).astype(np.float32), prep.cond)
    b = mdl.decode(decoder, (np.asarray(csim[sel], dtype=np.float64) / scale).astype(np.float32), prep.cond)
    equal = bool(np.array_equal(a, b))
    out = {"wafers": n_test, "equal": equal, "max_abs_diff": float(np.max(np.abs(a - b))) if n_test else 0.0}
    log(
        f"  reconstruction of {n_test:,} test wafers from C-sim latents "
        + ("== from QKeras latents" if equal else f"DIFFERS from QKeras latents (max |diff| {out['max_abs_diff']:.3g})")
    )
    return out


def verify_all(
    run_dir: Path | None,
    config_paths: list[Path],
    hls_dir: Path,
    n_wafers: int = 0,
    extra: data.Wafers | None = None,
    log: Log = print,
) -> bool:
    """``make verify``: every config's C simulation against QKeras; False on any mismatch."""
    from . import train

    if not config_paths:
        raise EcqaeError("no firmware configs given (firmware_configs/*.yaml)")
    if n_wafers < 0:
        raise EcqaeError(f"--wafers must be >= 0, got {n_wafers}")
    fws = [firmware.load_config(p) for p in config_paths]
    hls_dir = Path(hls_dir)
    corners = corner_cases()
    runs: dict[Path, Any] = {}
    opened = []
    for fw in fws:  # refuse stale or missing projects before spending time on any
        path = Path(run_dir or fw.run or "runs/default")
        if path not in runs:
            runs[path] = train.load_run(path)
        run = runs[path]
        opened.append((fw, run, firmware.open_project(hls_dir / fw.name, fw, run.run_id)))
    results: dict[str, Any] = {}
    ok = True
    t0 = time.perf_counter()
    for fw, run, project in opened:
        test = run.test_wafers()
        if n_wafers:
            test = test.take(np.arange(min(n_wafers, len(test))))
        parts = [("test", test), ("corner", corners)]
        if extra is not None:
            parts.append((Path(extra.source).name or "extra", extra))
        wafers, spans = _concat(parts)
        with tempfile.TemporaryDirectory(prefix=f".{fw.name}.trace.", dir=hls_dir) as work:
            rep = verify_config(fw, run, project, wafers, spans, len(test), Path(work), log)
        rep["run_id"] = run.run_id
        results[fw.name] = rep
        ok = ok and rep["ok"]
    summary = {"ok": ok, "seconds": round(time.perf_counter() - t0, 2), "configs": results}
    artifacts.write_json(hls_dir / "verify.json", summary)
    log(f"verify: {'all configs bit-exact' if ok else 'MISMATCH'} ({hls_dir / 'verify.json'})")
    return ok
