"""Wafers in: the CSV reader, the embedded generator, normalisation and splits.

A wafer is 48 integer TC charges (ECON-T input counts, 22-bit) plus its eta.
``prepare`` turns wafers into what the model sees: the 9x9 image on the
encoder's input grid, the per-TC target fractions, and the decoder conditions
as the receiving side knows them (the 9-bit encoded sum, decoded; eta).
"""

from __future__ import annotations

import gzip
import io
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import chip
from .errors import EcqaeError

CALQ_RE = re.compile(r"^CALQ_(\d+)$")
CHUNK_ROWS = 65536


@dataclass
class Wafers:
    """Raw wafers: integer charges (N, 48) and eta (N,)."""

    charges: np.ndarray
    eta: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return int(self.charges.shape[0])

    def take(self, idx: np.ndarray) -> Wafers:
        return Wafers(self.charges[idx], self.eta[idx], self.source)


@dataclass
class Prepared:
    """Model-ready arrays derived from Wafers (see module docstring)."""

    images: np.ndarray  # (N, 9, 9, 1) float32 on the input grid
    target: np.ndarray  # (N, 48) float32, charge / sum
    cond: np.ndarray  # (N, 2) float32: scaled log2 of decoded sum, scaled eta
    sum_word: np.ndarray  # (N,) int64, the chip's 9-bit encoded sum
    sum_decoded: np.ndarray  # (N,) int64, what the receiver knows
    charges: np.ndarray
    eta: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


# ----------------------------------------------------------------------------- CSV


def _open_text(path: Path) -> io.TextIOBase:
    """Open plain or gzip-compressed text, decided by the file's magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _sniff_separator(header: str, path: Path) -> str:
    for sep in (",", ";", "\t", "|"):
        if sum(1 for c in header.split(sep) if CALQ_RE.match(c.strip().strip('"'))) >= 2:
            return sep
    if re.search(r"CALQ_\d+\s+CALQ_\d+", header):
        return " "
    raise EcqaeError(f"{path}: no CALQ_* columns in the header (expected CALQ_0 ... CALQ_47)")


def _split(line: str, sep: str) -> list[str]:
    return line.split() if sep == " " else [c.strip().strip('"') for c in line.split(sep)]


def _columns(header: list[str], path: Path, eta_column: str | None) -> tuple[np.ndarray, int | None]:
    """Indices of CALQ_0..47 in the file (any order, extras ignored) and of the eta column."""
    found: dict[int, int] = {}
    for i, name in enumerate(header):
        m = CALQ_RE.match(name)
        if m:
            tc = int(m.group(1))
            if tc in found:
                raise EcqaeError(f"{path}: column CALQ_{tc} appears twice")
            found[tc] = i
    if not found:
        raise EcqaeError(f"{path}: no CALQ_* columns in the header (expected CALQ_0 ... CALQ_47)")
    missing = [tc for tc in range(chip.N_TC) if tc not in found]
    if missing:
        shown = ", ".join(f"CALQ_{tc}" for tc in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise EcqaeError(f"{path}: {len(found)} CALQ columns, expected 48; missing {shown}")
    extra = sorted(tc for tc in found if tc >= chip.N_TC)
    if extra:
        raise EcqaeError(f"{path}: unexpected column CALQ_{extra[0]} (TCs are numbered 0..47)")
    eta_idx = None
    if eta_column is not None:
        if eta_column not in header:
            raise EcqaeError(f"{path}: no column named '{eta_column}' for eta")
        eta_idx = header.index(eta_column)
    return np.array([found[tc] for tc in range(chip.N_TC)]), eta_idx


def _parse_rows(
    lines: list[str], sep: str, usecols: list[int], first_row: int, path: Path, header: list[str]
) -> np.ndarray:
    """Parse the used columns of a chunk to float64 (rows, len(usecols)); errors name row and column.

    Columns we do not use (a sample tag, an event id) may hold anything.
    """
    ncol = len(header)
    try:
        arr = np.loadtxt(
            lines, delimiter=None if sep == " " else sep, dtype=np.float64, ndmin=2, quotechar='"', usecols=usecols
        )
        if arr.shape == (len(lines), len(usecols)) and all(_count(line, sep) == ncol for line in lines[:1]):
            return arr
    except ValueError:
        pass
    # Slow path only to say exactly what is wrong.
    out = np.empty((len(lines), len(usecols)))
    for j, line in enumerate(lines):
        cells = _split(line, sep)
        row = first_row + j
        if len(cells) != ncol:
            raise EcqaeError(f"{path}: row {row}: {len(cells)} fields, header has {ncol}")
        for k, col in enumerate(usecols):
            try:
                out[j, k] = float(cells[col])
            except ValueError:
                raise EcqaeError(f"{path}: row {row}, column {header[col]}: not a number ({cells[col]!r})") from None
    return out


def _count(line: str, sep: str) -> int:
    return len(_split(line, sep))


def _iter_chunks(path: Path, max_rows: int) -> Iterator[tuple[list[str], int, str, list[str]]]:
    """Stream (lines, first_row_number, separator, header) chunks; stops after max_rows."""
    try:
        f = _open_text(path)
    except FileNotFoundError:
        raise EcqaeError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise EcqaeError(f"{path}: is a directory, expected a CSV file") from None
    except OSError as exc:
        raise EcqaeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with f:
        try:
            header_line = f.readline()
            while header_line and not header_line.strip():
                header_line = f.readline()
            if not header_line:
                raise EcqaeError(f"{path}: file is empty")
            header_line = header_line.lstrip("\ufeff").rstrip("\r\n")
            sep = _sniff_separator(header_line, path)
            header = _split(header_line, sep)
            taken, row = 0, 2  # row numbers as a spreadsheet shows them (header = row 1)
            while True:
                lines: list[str] = []
                first = row
                while len(lines) < CHUNK_ROWS and (max_rows <= 0 or taken + len(lines) < max_rows):
                    line = f.readline()
                    if not line:
                        break
                    row += 1
                    if line.strip():
                        lines.append(line.rstrip("\r\n"))
                    elif not lines:
                        first = row
                if not lines:
                    return
                taken += len(lines)
                yield lines, first, sep, header
        except (EOFError, gzip.BadGzipFile, OSError) as exc:
            raise EcqaeError(f"{path}: corrupt or truncated file ({exc})") from None


def parse_eta(spec: str) -> tuple[str, float | tuple[float, float] | str]:
    """'2.2' -> value, '1.6:2.9' -> range, 'auto' -> column 'eta' if present, else a column name."""
    spec = str(spec).strip()
    if ":" in spec:
        lo_s, hi_s = spec.split(":", 1)
        try:
            lo, hi = float(lo_s), float(hi_s)
        except ValueError:
            raise EcqaeError(f"eta range '{spec}' must be LO:HI with numbers") from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise EcqaeError(f"eta range '{spec}' must have finite LO <= HI")
        return "range", (lo, hi)
    try:
        value = float(spec)
    except ValueError:
        return ("auto", "eta") if spec == "auto" else ("column", spec)
    if not math.isfinite(value):
        raise EcqaeError(f"eta value '{spec}' is not finite")
    return "value", value


def read_csv(path: str | Path, eta: str = "auto", max_rows: int = 0, seed: int = 0) -> Wafers:
    """Read wafers from a CALQ CSV (plain or gzip), validating every cell.

    Charges must be finite, non-negative integers; values above 22 bits are
    clipped as the chip does (with a warning). Eta comes from a column, or from
    the value or seeded uniform range the user gives.
    """
    path = Path(path)
    kind, eta_arg = parse_eta(eta)
    charges: list[np.ndarray] = []
    etas: list[np.ndarray] = []
    clipped = 0
    cols = eta_idx = None
    for lines, first, sep, header in _iter_chunks(path, max_rows):
        if cols is None:
            name = eta_arg if kind in ("auto", "column") else None
            if kind == "auto" and "eta" not in header:
                raise EcqaeError(f"{path}: no 'eta' column; give eta as a value (--eta 2.2) or a range (--eta 1.6:2.9)")
            cols, eta_idx = _columns(header, path, name)  # type: ignore[arg-type]
        usecols = [*cols.tolist(), *([eta_idx] if eta_idx is not None else [])]
        arr = _parse_rows(lines, sep, usecols, first, path, header)
        q = arr[:, : chip.N_TC]
        bad = ~np.isfinite(q)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise EcqaeError(f"{path}: row {first + r}, column CALQ_{c}: {q[r, c]} is not a finite charge")
        for cond, what in ((q < 0, "negative charge"), (q != np.round(q), "fractional charge")):
            if cond.any():
                r, c = np.argwhere(cond)[0]
                raise EcqaeError(f"{path}: row {first + r}, column CALQ_{c}: {what} {q[r, c]:g}")
        over = q > chip.CHARGE_MAX
        clipped += int(over.sum())
        charges.append(np.minimum(q, chip.CHARGE_MAX).astype(np.int32))
        if eta_idx is not None:
            e = arr[:, chip.N_TC]
            if not np.all(np.isfinite(e)):
                r = int(np.flatnonzero(~np.isfinite(e))[0])
                raise EcqaeError(f"{path}: row {first + r}, column {header[eta_idx]}: eta is not finite")
            etas.append(e.astype(np.float32))
    if not charges:
        raise EcqaeError(f"{path}: no data rows")
    q_all = np.concatenate(charges)
    if clipped:
        print(f"ecqae: warning: {path}: {clipped} charges above 22 bits clipped to {chip.CHARGE_MAX}", file=sys.stderr)
    n = q_all.shape[0]
    if etas:
        eta_all = np.concatenate(etas)
    elif kind == "value":
        eta_all = np.full(n, eta_arg, dtype=np.float32)
    else:
        lo, hi = eta_arg  # type: ignore[misc]
        eta_all = np.random.default_rng(seed).uniform(lo, hi, n).astype(np.float32)
    return Wafers(q_all, eta_all, str(path))


# ----------------------------------------------------------------------------- generator

# Generator parameters (see ``generate``); in ECON-T input counts.
NOISE_COUNTS = (2.0, 3.5, 6.0)  # noise sigma per TC for 300, 200, 120 um silicon
ZS_SIGMA = 3.0  # zero-suppression threshold in noise sigmas
PU_DEPOSITS = (0.5, 24.0)  # mean pileup deposits per wafer at eta 1.5 and 3.0 (quadratic in between)
PU_MEAN_COUNTS = 30.0  # mean energy of one pileup deposit (exponential)
SHOWER_PROB = 0.7  # chance of a shower core on the wafer (a second one: SHOWER_PROB / 4)
SHOWER_COUNTS = (35.0, 35.0 * 300)  # log-uniform shower energy range (1 to 300 MIP_T)
SHOWER_RADIUS_CM = (0.5, 1.5)  # exponential lateral profile scale, uniform range


def generate(n: int, seed: int = 0) -> Wafers:
    """The embedded default dataset: ``n`` realistic wafers, deterministic in ``seed``.

    Model, per wafer:
    - eta uniform over the endcap, 1.5 < eta < 3.0; silicon thickness by eta
      (300/200/120 um, chip.THICKNESS_EDGES) sets the noise in calibrated counts,
      larger for thinner sensors (less signal per MIP).
    - pileup: a Poisson number of diffuse deposits whose mean rises
      quadratically with eta (0.5 -> 24), each in a random TC with an
      exponential energy (mean 30 counts, about 1 MIP_T).
    - shower cores: with probability 0.7 (a second with 0.175) a shower of
      log-uniform energy 1..300 MIP_T centred near a random TC, spread over its
      neighbours with an exponential lateral profile of 0.5..1.5 cm on the real
      hexagonal TC geometry.
    - Gaussian noise, zero suppression at 3 sigma, rounding to integers, and
      clipping to 22 bits. A wafer left empty gets one isolated hit of about
      1 MIP_T, since the chip sends nothing for empty wafers.
    Vectorised: a million wafers take a few seconds.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = np.random.default_rng(seed)
    eta = rng.uniform(chip.ETA_MIN, chip.ETA_MAX, n).astype(np.float32)
    u = (eta - chip.ETA_MIN) / (chip.ETA_MAX - chip.ETA_MIN)
    q = np.zeros((n, chip.N_TC), dtype=np.float32)

    # Pileup: Poisson count, random TCs; accumulate with bincount on flat indices.
    lam = PU_DEPOSITS[0] + (PU_DEPOSITS[1] - PU_DEPOSITS[0]) * u**2
    n_pu = rng.poisson(lam)
    wafer_of = np.repeat(np.arange(n), n_pu)
    tc_of = rng.integers(0, chip.N_TC, wafer_of.size)
    e_pu = rng.exponential(PU_MEAN_COUNTS, wafer_of.size)
    q += np.bincount(wafer_of * chip.N_TC + tc_of, weights=e_pu, minlength=n * chip.N_TC).reshape(q.shape)

    # Shower cores on the hexagonal geometry.
    for prob in (SHOWER_PROB, SHOWER_PROB / 4):
        has = np.flatnonzero(rng.random(n) < prob)
        centre = chip.TC_XY[rng.integers(0, chip.N_TC, has.size)] + rng.normal(0.0, 1.0, (has.size, 2))
        radius = rng.uniform(*SHOWER_RADIUS_CM, has.size)
        log_lo, log_hi = np.log(SHOWER_COUNTS[0]), np.log(SHOWER_COUNTS[1])
        energy = np.exp(rng.uniform(log_lo, log_hi, has.size))
        d = np.hypot(
            chip.TC_XY[None, :, 0] - centre[:, None, 0],
            chip.TC_XY[None, :, 1] - centre[:, None, 1],
        )
        profile = np.exp(-d / radius[:, None])
        q[has] += (energy / profile.sum(axis=1))[:, None] * profile

    sigma = np.asarray(NOISE_COUNTS, dtype=np.float32)[chip.thickness_region(eta)]
    q += rng.normal(0.0, 1.0, q.shape).astype(np.float32) * sigma[:, None]
    q[q < ZS_SIGMA * sigma[:, None]] = 0.0
    charges = np.clip(np.rint(q), 0, chip.CHARGE_MAX).astype(np.int32)

    empty = np.flatnonzero(charges.sum(axis=1) == 0)
    charges[empty, rng.integers(0, chip.N_TC, empty.size)] = rng.integers(chip.MIP_T // 2, 2 * chip.MIP_T, empty.size)
    return Wafers(charges, eta, f"embedded(n={n}, seed={seed})")


# ----------------------------------------------------------------------------- model inputs

LOG_SUM_SCALE = 1.0 / chip.CHARGE_BITS
ETA_CENTRE, ETA_HALF_WIDTH = 0.5 * (chip.ETA_MIN + chip.ETA_MAX), 0.5 * (chip.ETA_MAX - chip.ETA_MIN)


def conditions(sum_decoded: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Decoder conditions: log2(1 + decoded sum) / 22 and |eta| scaled to [-1, 1] over the endcap.

    |eta|: the two endcaps are mirror images. Values outside the endcap are
    used as given (the decoder extrapolates), never clipped silently to NaN.
    """
    log_sum = np.log2(1.0 + np.asarray(sum_decoded, dtype=np.float64)) * LOG_SUM_SCALE
    eta_s = (np.abs(np.asarray(eta, dtype=np.float64)) - ETA_CENTRE) / ETA_HALF_WIDTH
    return np.stack([log_sum, eta_s], axis=1).astype(np.float32)


def prepare(wafers: Wafers) -> Prepared:
    """Everything the model and the firmware check need, from raw wafers."""
    x, total = chip.normalise(wafers.charges)
    word = chip.encode_sum(total)
    decoded = chip.decode_sum(word)
    q = np.clip(wafers.charges, 0, chip.CHARGE_MAX).astype(np.float64)
    target = np.where(total[:, None] > 0, q / np.maximum(total, 1)[:, None], 0.0).astype(np.float32)
    return Prepared(
        images=chip.tc_to_image(x),
        target=target,
        cond=conditions(decoded, wafers.eta),
        sum_word=word,
        sum_decoded=decoded,
        charges=wafers.charges,
        eta=wafers.eta,
    )


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Shuffled (train, val, test) index arrays; disjoint, covering all n, fixed by seed."""
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    return perm[n_test + n_val :], perm[n_test : n_test + n_val], perm[:n_test]


def save_wafers(path: str | Path, wafers: Wafers) -> None:
    """Atomic .npz of charges and eta: what later stages re-derive everything from."""
    from .artifacts import write_with

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, charges=wafers.charges.astype(np.int32), eta=wafers.eta.astype(np.float32))

    write_with(path, writer)


def load_wafers(path: str | Path) -> Wafers:
    p = Path(path)
    try:
        with np.load(p) as z:
            return Wafers(z["charges"].astype(np.int32), z["eta"].astype(np.float32), str(p))
    except FileNotFoundError:
        raise EcqaeError(f"{p}: file not found") from None
    except (OSError, KeyError, ValueError) as exc:
        raise EcqaeError(f"{p}: not a wafer file ({exc})") from None


def load(source: str, n_wafers: int = 0, eta: str = "auto", seed: int = 0) -> Wafers:
    """Wafers from 'embedded' (the generator) or from a CSV path."""
    if source == "embedded":
        return generate(n_wafers or 200_000, seed)
    return read_csv(source, eta=eta, max_rows=n_wafers, seed=seed)
