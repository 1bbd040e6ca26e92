"""How physicists judge a reconstructed wafer (reference §6), on (N, 48) charges.

All metrics compare a true wafer with its reconstruction, TC by TC, in the
CALQ order; charges are in ECON-T input counts (floats allowed for
reconstructions). Spatial metrics use the TC centres ``chip.TC_XY`` scaled by
``chip.EMD_COORD_SCALE`` so that neighbouring TCs in a sector are 2 units apart.

- ``emd``: Energy Mover's Distance: optimal transport (POT's ``ot.emd2``, an
  exact network-simplex solver) between the sum-normalised wafers, Euclidean
  ground distance. Bounded by the largest TC distance, ``MAX_DISTANCE`` ~ 13.76.
- ``centroid``: distance between the energy-weighted centroids.
- ``rms_diff``: reconstructed minus true energy-weighted RMS width
  sqrt(sum_i w_i |r_i - centroid|^2): negative when a shower comes back narrower.
- ``occupancy``: number of reconstructed TCs above 1 MIP_T (strictly > 35 counts).
- ``sum_ratio``: reconstructed / true charge sum.

Field conventions: a wafer with an empty input scores ``EMPTY_INPUT`` (-1) in
every metric but occupancy; an empty output scores ``EMPTY_OUTPUT`` (-0.5) in
the shape metrics (emd, centroid, rms_diff) and 0 in ``sum_ratio``.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from . import chip

# POT probes every array backend it knows at import; TensorFlow alone costs
# seconds (and memory in each worker) and we only pass numpy arrays.
for _backend in ("TENSORFLOW", "PYTORCH", "JAX", "CUPY"):
    os.environ.setdefault(f"POT_BACKEND_DISABLE_{_backend}", "1")

import ot  # noqa: E402

EMPTY_INPUT = -1.0
EMPTY_OUTPUT = -0.5
METRICS = ("emd", "centroid", "rms_diff", "occupancy", "sum_ratio")
SHAPE_METRICS = ("emd", "centroid", "rms_diff")  # the ones with the -1 / -0.5 conventions

TC_POSITIONS = chip.TC_XY * chip.EMD_COORD_SCALE  # (48, 2), EMD units
GROUND_DISTANCE = ot.dist(TC_POSITIONS, TC_POSITIONS, metric="euclidean")  # (48, 48)
MAX_DISTANCE = float(GROUND_DISTANCE.max())

PARALLEL_MIN = 50_000  # fewer wafers than this: in-process, with no progress lines
DEFAULT_PROCESSES = 2
CHUNK = 4096
# Workers are spawned, never forked: the parent may have TensorFlow's threads
# running, and fork() copies their locks but not the threads. Each spawned
# worker pays the solver's import (~3 s), hence PARALLEL_MIN.
MP_START = "spawn"
Log = Callable[[str], None]


def _as_charges(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != chip.N_TC:
        raise ValueError(f"{name} must have shape (N, {chip.N_TC}), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite charges")
    if np.any(a < 0):
        raise ValueError(f"{name} has negative charges")
    return a


def _pair(true: np.ndarray, reco: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(true, reco, true sums, reco sums) as float64, shapes checked."""
    t, r = _as_charges(true, "true"), _as_charges(reco, "reco")
    if t.shape != r.shape:
        raise ValueError(f"true {t.shape} and reco {r.shape} differ in shape")
    return t, r, t.sum(axis=1), r.sum(axis=1)


def _conventions(st: np.ndarray, sr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(output array pre-filled with the conventions, mask of wafers to compute)."""
    out = np.zeros(st.shape[0])
    out[sr <= 0] = EMPTY_OUTPUT
    out[st <= 0] = EMPTY_INPUT  # an empty input wins over an empty output
    return out, (st > 0) & (sr > 0)


def _normalised(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    return q / s[:, None]


def _emd_chunk(pairs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """EMD of sum-normalised wafer pairs; runs in a worker process or in-process.

    Zero-mass TCs are dropped before the solve: the transport problem shrinks
    from 48x48 to (occupied x occupied) and the cost is unchanged.
    """
    a_all, b_all = pairs
    out = np.empty(a_all.shape[0])
    for i in range(a_all.shape[0]):
        a, b = a_all[i], b_all[i]
        ia, ib = np.flatnonzero(a > 0), np.flatnonzero(b > 0)
        # Both marginals sum to 1 by construction; the dual potentials are not needed.
        out[i] = ot.emd2(a[ia], b[ib], GROUND_DISTANCE[np.ix_(ia, ib)], check_marginals=False, center_dual=False)
    return out


def emd(
    true: np.ndarray,
    reco: np.ndarray,
    processes: int | None = None,
    log: Log | None = None,
    chunk: int = CHUNK,
) -> np.ndarray:
    """Energy Mover's Distance per wafer, EMD units; -1 / -0.5 for empty input / output.

    ``processes``: None picks 2 worker processes for large inputs (at least
    ``PARALLEL_MIN`` wafers) and none otherwise; 1 forces in-process work. Results
    do not depend on it. Workers are spawned, so a script calling this needs the
    usual ``if __name__ == "__main__":`` guard to use them. ``log`` gets a
    progress line every few seconds; ``chunk`` wafers go to a worker at a time.
    """
    t, r, st, sr = _pair(true, reco)
    out, ok = _conventions(st, sr)
    idx = np.flatnonzero(ok)
    a, b = _normalised(t[idx], st[idx]), _normalised(r[idx], sr[idx])
    chunks = [(a[i : i + chunk], b[i : i + chunk]) for i in range(0, idx.size, chunk)]
    if processes is None:
        processes = DEFAULT_PROCESSES if idx.size >= PARALLEL_MIN else 1
    start = last = time.monotonic()
    results: list[np.ndarray] = []

    def progress(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if log is not None and (now - last > 5.0 or done == idx.size) and idx.size >= PARALLEL_MIN:
            last = now
            log(f"  emd: {done:,}/{idx.size:,} wafers, {now - start:.1f} s")

    if processes > 1 and len(chunks) > 1:
        ctx = multiprocessing.get_context(MP_START)
        try:
            with ProcessPoolExecutor(max_workers=processes, mp_context=ctx) as pool:
                for res in pool.map(_emd_chunk, chunks):
                    results.append(res)
                    progress(sum(x.size for x in results))
        except BrokenProcessPool:
            # Typically a script without the `if __name__ == "__main__":` guard that spawned
            # workers need; the answer does not depend on the workers, so finish in-process.
            if log is not None:
                log("  emd: worker processes failed to start; continuing in this process")
            results = []
    for part in chunks[len(results) :]:
        results.append(_emd_chunk(part))
        progress(sum(x.size for x in results))
    if results:
        out[idx] = np.concatenate(results)
    return out


def _centroids(w: np.ndarray) -> np.ndarray:
    return w @ TC_POSITIONS  # (N, 2)


def _widths(w: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    d2 = ((TC_POSITIONS[None, :, :] - centroid[:, None, :]) ** 2).sum(axis=2)
    return np.sqrt(np.maximum((w * d2).sum(axis=1), 0.0))


def centroid_distance(true: np.ndarray, reco: np.ndarray) -> np.ndarray:
    """Distance between energy-weighted centroids, EMD units; -1 / -0.5 conventions."""
    t, r, st, sr = _pair(true, reco)
    out, ok = _conventions(st, sr)
    ct, cr = _centroids(_normalised(t[ok], st[ok])), _centroids(_normalised(r[ok], sr[ok]))
    out[ok] = np.hypot(*(cr - ct).T)
    return out


def rms_diff(true: np.ndarray, reco: np.ndarray) -> np.ndarray:
    """Reconstructed minus true energy-weighted RMS width, EMD units; -1 / -0.5 conventions.

    Note the convention values can collide with a genuine negative difference;
    use the masks from ``compute`` (empty input / output), not the sign.
    """
    t, r, st, sr = _pair(true, reco)
    out, ok = _conventions(st, sr)
    wt, wr = _normalised(t[ok], st[ok]), _normalised(r[ok], sr[ok])
    out[ok] = _widths(wr, _centroids(wr)) - _widths(wt, _centroids(wt))
    return out


def occupancy(charges: np.ndarray) -> np.ndarray:
    """TCs strictly above 1 MIP_T (35 counts) per wafer."""
    return (_as_charges(charges, "charges") > chip.MIP_T).sum(axis=1)


def sum_ratio(true: np.ndarray, reco: np.ndarray) -> np.ndarray:
    """Reconstructed / true charge sum; -1 for an empty input, 0 for an empty output."""
    _, _, st, sr = _pair(true, reco)
    return np.where(st > 0, sr / np.where(st > 0, st, 1.0), EMPTY_INPUT)


def compute(
    true: np.ndarray, reco: np.ndarray, processes: int | None = None, log: Log | None = None
) -> dict[str, np.ndarray]:
    """Every metric per wafer, plus boolean masks ``empty_input`` and ``empty_output``."""
    t, r, st, sr = _pair(true, reco)
    return {
        "emd": emd(t, r, processes=processes, log=log),
        "centroid": centroid_distance(t, r),
        "rms_diff": rms_diff(t, r),
        "occupancy": occupancy(r),
        "sum_ratio": sum_ratio(t, r),
        "empty_input": st <= 0,
        "empty_output": (sr <= 0) & (st > 0),
    }


def valid_mask(values: dict[str, np.ndarray], metric: str) -> np.ndarray:
    """Wafers where ``metric`` is a measurement rather than a convention value."""
    ok = ~values["empty_input"]
    if metric in SHAPE_METRICS:
        ok &= ~values["empty_output"]
    return ok


def summarise(x: np.ndarray) -> dict[str, float | int | None]:
    """Mean, median and the 68% interval (16th-84th percentiles); None when empty."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {"n": 0, "mean": None, "median": None, "p16": None, "p84": None}
    p16, p50, p84 = np.percentile(x, [16, 50, 84])
    return {"n": int(x.size), "mean": float(x.mean()), "median": float(p50), "p16": float(p16), "p84": float(p84)}
