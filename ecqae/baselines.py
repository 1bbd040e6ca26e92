"""The classical ECON-T algorithms the autoencoder must beat, at equal bandwidth.

Each takes integer charges (N, 48) in CALQ order and returns the charges the
receiving side reconstructs (int64, same shape); TCs not sent are zero.
Transmitted charges are kept exact (the chip would round them to a short
float), which if anything favours the baselines.

- threshold: TCs strictly above 1.35 or 2.0 MIP_T. A fixed-bandwidth link
  cannot carry every TC above threshold in a busy wafer, so at an e-link budget
  it sends at most as many TCs as best-choice does (``chip.BEST_CHOICE_N``),
  the largest first.
- best-choice: the n largest TCs, n = 4, 6, 9, 14 for 2, 3, 4, 5 e-links.
- super-trigger-cell: each 16-TC sector's sum placed in its largest TC; three
  sums and three 4-bit addresses fit the smallest (2 e-link) budget, so it is
  the same at every budget.
Ties go to the lower TC index, so every output is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import chip

THRESHOLDS_MIPT = (1.35, 2.0)
ELINK_SETTINGS = tuple(sorted(chip.BEST_CHOICE_N))


def _charges(charges: np.ndarray) -> np.ndarray:
    q = np.asarray(charges)
    if q.ndim != 2 or q.shape[1] != chip.N_TC:
        raise ValueError(f"charges must have shape (N, {chip.N_TC}), got {q.shape}")
    if not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"charges must be integers, got {q.dtype}")
    if np.any(q < 0):
        raise ValueError("charges must be non-negative")
    return q.astype(np.int64)


def budget_tcs(elinks: int) -> int:
    """TCs an e-link budget carries in the best-choice format."""
    if elinks not in chip.BEST_CHOICE_N:
        raise ValueError(f"no best-choice format for {elinks} e-links (have {sorted(chip.BEST_CHOICE_N)})")
    return chip.BEST_CHOICE_N[elinks]


def _keep_largest(q: np.ndarray, n: int) -> np.ndarray:
    """Zero all but the n largest TCs of each wafer (ties: lower TC index first)."""
    if n >= chip.N_TC:
        return q.copy()
    order = np.argsort(-q, axis=1, kind="stable")[:, :n]
    out = np.zeros_like(q)
    np.put_along_axis(out, order, np.take_along_axis(q, order, axis=1), axis=1)
    return out


def threshold(charges: np.ndarray, mipt: float, elinks: int | None = None) -> np.ndarray:
    """TCs strictly above ``mipt`` MIP_T; at most ``budget_tcs(elinks)`` of them if a budget is given."""
    q = _charges(charges)
    kept = np.where(q > mipt * chip.MIP_T, q, 0)
    return kept if elinks is None else _keep_largest(kept, budget_tcs(elinks))


def threshold_truncated(charges: np.ndarray, mipt: float, elinks: int) -> np.ndarray:
    """Wafers whose TCs above threshold exceed the budget (so the cap drops some)."""
    q = _charges(charges)
    return (q > mipt * chip.MIP_T).sum(axis=1) > budget_tcs(elinks)


def best_choice(charges: np.ndarray, n: int) -> np.ndarray:
    """The n largest TCs of each wafer."""
    if n < 1:
        raise ValueError(f"best-choice n must be >= 1, got {n}")
    return _keep_largest(_charges(charges), n)


def super_trigger_cell(charges: np.ndarray) -> np.ndarray:
    """Each 16-TC sector's charge sum placed in its largest TC (energy is conserved)."""
    q = _charges(charges)
    sectors = q.reshape(q.shape[0], chip.N_SECTORS, chip.TC_PER_SECTOR)
    out = np.zeros_like(sectors)
    top = np.argmax(sectors, axis=2)[..., None]  # first maximum: lowest index wins ties
    np.put_along_axis(out, top, sectors.sum(axis=2, keepdims=True), axis=2)
    return out.reshape(q.shape)


@dataclass(frozen=True)
class Baseline:
    """One algorithm at one e-link budget: ``name`` is stable (JSON key), ``label`` is for people."""

    name: str
    label: str
    elinks: int
    reco: np.ndarray
    info: dict[str, float] = field(default_factory=dict)


def run_all(charges: np.ndarray, elinks: tuple[int, ...] = ELINK_SETTINGS) -> list[Baseline]:
    """Every baseline at every budget, on the same wafers."""
    q = _charges(charges)
    stc = super_trigger_cell(q)
    out: list[Baseline] = []
    for e in elinks:
        n = budget_tcs(e)
        for t in THRESHOLDS_MIPT:
            truncated = float(threshold_truncated(q, t, e).mean())
            out.append(
                Baseline(
                    f"threshold_{t:g}",
                    f"threshold {t:g} MIP_T",
                    e,
                    threshold(q, t, e),
                    {"truncated_fraction": truncated},
                )
            )
        out.append(Baseline("best_choice", f"best-choice n={n}", e, best_choice(q, n)))
        out.append(Baseline("stc", "super-trigger-cell", e, stc))
    return out
