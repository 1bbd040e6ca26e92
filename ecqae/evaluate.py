"""Physics evaluation: the autoencoder against the classical algorithms, one command.

On a run's saved test split: reconstruct through the quantized encoder and the
decoder (conditioned on the 9-bit sum as the receiving side decodes it, and on
eta), run every baseline on the same wafers, compute the metrics of
``ecqae.metrics`` per wafer, and summarise them (mean, median, 68% interval)
per algorithm, per e-link budget and per eta bin (the three sensor-thickness
regions and "all"). Writes, each file atomically:

  evaluation.json       the whole summary (the machine-readable table)
  evaluation.txt        the same table as printed
  emd_distributions.png EMD per algorithm, one panel per e-link budget
  emd_vs_sum.png        median EMD (and 68% band for the autoencoders) vs wafer sum
  emd_vs_eta.png        the same vs eta, with the thickness regions marked
  event_display.png     a few wafers and their reconstructions on the hexagonal TC geometry

``evaluation.json`` is written last: when it exists, the plots it lists do too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import artifacts, baselines, chip, data, metrics
from .errors import EcqaeError

Log = Callable[[str], None]

PLOTS = ("emd_distributions.png", "emd_vs_sum.png", "emd_vs_eta.png", "event_display.png")
DEFINITIONS = {
    "emd": "Energy Mover's Distance between sum-normalised wafers (POT ot.emd2), units where neighbouring TCs "
    "are 2 apart; max ~13.76",
    "centroid": "distance between energy-weighted centroids, same units",
    "rms_diff": "reconstructed minus true energy-weighted RMS width, same units (negative = narrower)",
    "occupancy": "reconstructed TCs above 1 MIP_T (> 35 counts)",
    "sum_ratio": "reconstructed / true charge sum",
    "empty_output_fraction": "wafers whose reconstruction is empty; excluded from emd, centroid and rms_diff "
    "statistics (the field's -0.5 convention)",
    "interval": "p16, p84: the central 68% of wafers",
}
TABLE_FORMATS = {"emd": ".3f", "centroid": ".3f", "rms_diff": ".3f", "occupancy": ".1f", "sum_ratio": ".3f"}
TABLE_TITLES = {
    "emd": "EMD [units: 1.21 cm, neighbouring TCs = 2]",
    "centroid": "centroid distance (same units)",
    "rms_diff": "RMS width, reconstructed - true (same units)",
    "occupancy": "occupancy: TCs > 1 MIP_T",
    "sum_ratio": "reconstructed / true sum",
}
COLOURS = {
    "ae": "tab:red",
    "ae_ablation": "tab:orange",
    "best_choice": "tab:blue",
    "threshold_1.35": "tab:green",
    "threshold_2": "tab:purple",
    "stc": "tab:gray",
}
DISPLAY_QUANTILES = (0.5, 0.75, 0.9, 0.99)  # wafer-sum quantiles of the wafers in the event display


@dataclass
class Entry:
    """One reconstruction of the test wafers: an algorithm at an e-link budget."""

    name: str
    label: str
    elinks: int
    reco: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)


def eta_bins() -> dict[str, dict[str, Any]]:
    """The per-eta bins: one per sensor-thickness region (chip.THICKNESS_EDGES)."""
    e = chip.THICKNESS_EDGES
    return {
        f"{lo:.1f}-{hi:.1f}": {"eta": [lo, hi], "thickness_um": um, "region": i}
        for i, (lo, hi, um) in enumerate(zip(e[:-1], e[1:], chip.THICKNESS_UM, strict=True))
    }


def bin_masks(eta: np.ndarray) -> dict[str, np.ndarray]:
    """'all' and one mask per thickness region (out-of-range eta joins the nearest region)."""
    region = chip.thickness_region(eta)
    masks = {"all": np.ones(eta.shape[0], dtype=bool)}
    masks.update({key: region == b["region"] for key, b in eta_bins().items()})
    return masks


def reconstruct(encoder: Any, decoder: Any, wafers: data.Wafers) -> np.ndarray:
    """Autoencoder reconstruction in charge units: decoder fractions x the decoded 9-bit sum."""
    from . import model

    prep = data.prepare(wafers)
    latent = model.encode(encoder, prep.images)
    fractions = model.decode(decoder, latent, prep.cond)
    return fractions.astype(np.float64) * prep.sum_decoded[:, None].astype(np.float64)


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    return x


def summarise_entry(entry: Entry, masks: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per eta bin: wafer count, empty-output fraction and each metric's statistics."""
    v = entry.values
    out: dict[str, Any] = {}
    for key, m in masks.items():
        n = int(m.sum())
        row: dict[str, Any] = {
            "n": n,
            "empty_output_fraction": round(float(v["empty_output"][m].mean()), 6) if n else None,
        }
        for name in metrics.METRICS:
            row[name] = _round(metrics.summarise(v[name][m & metrics.valid_mask(v, name)]))
        out[key] = row
    return out


def _cell(s: dict[str, Any], fmt: str) -> str:
    if s["n"] == 0 or s["median"] is None:
        return "-"
    return f"{s['median']:{fmt}} [{s['p16']:{fmt}}, {s['p84']:{fmt}}] {s['mean']:{fmt}}"


def format_table(report: dict[str, Any]) -> str:
    """Human-readable table: one block per metric, rows = algorithm x e-links, columns = eta bins."""
    bins = ["all", *eta_bins()]
    head_bins = ["all"] + [f"eta {k} ({b['thickness_um']}um)" for k, b in eta_bins().items()]
    width = 32
    n_line = "  ".join(f"{k}: {report['input'][k]['n']}" for k in bins)
    lines = [
        f"Evaluation of run {report['run']['run_id']} on {report['wafers']['n']} test wafers ({n_line})",
        "cells: median [16%, 84%] mean",
    ]

    def header(title: str) -> None:
        lines.append("")
        lines.append(title)
        lines.append(f"{'e-links':>7}  {'algorithm':<26}" + "".join(f"{h:>{width}}" for h in head_bins))

    for name in metrics.METRICS:
        fmt = TABLE_FORMATS[name]
        header(TABLE_TITLES[name])
        if name == "occupancy":
            cells = "".join(f"{_cell(report['input'][k]['occupancy'], fmt):>{width}}" for k in bins)
            lines.append(f"{'':>7}  {'input':<26}" + cells)
        for r in report["results"]:
            cells = "".join(f"{_cell(r['bins'][k][name], fmt):>{width}}" for k in bins)
            lines.append(f"{r['elinks']:>7}  {r['label']:<26}" + cells)
    header("wafers with an empty reconstruction (fraction)")
    for r in report["results"]:
        fractions = [r["bins"][k]["empty_output_fraction"] for k in bins]
        cells = "".join(f"{'-' if f is None else format(f, '.3f'):>{width}}" for f in fractions)
        lines.append(f"{r['elinks']:>7}  {r['label']:<26}" + cells)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    artifacts.write_with(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    _pyplot().close(fig)


def _panels(elinks: list[int], size: tuple[float, float] = (6.0, 4.2)) -> tuple[Any, list[Any]]:
    plt = _pyplot()
    ncol = 2 if len(elinks) > 1 else 1
    nrow = -(-len(elinks) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(size[0] * ncol, size[1] * nrow), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[len(elinks) :]:
        ax.set_visible(False)
    return fig, flat[: len(elinks)]


def _valid_emd(e: Entry) -> tuple[np.ndarray, np.ndarray]:
    """(mask of wafers with a real EMD, all EMD values)."""
    ok = metrics.valid_mask(e.values, "emd")
    return ok, e.values["emd"]


def plot_emd_distributions(entries: list[Entry], path: Path) -> None:
    elinks = sorted({e.elinks for e in entries})
    fig, axes = _panels(elinks)
    all_emd = np.concatenate([emd[ok] for ok, emd in map(_valid_emd, entries)])
    xmax = float(min(np.percentile(all_emd, 99.5) * 1.05, metrics.MAX_DISTANCE)) if all_emd.size else 1.0
    edges = np.linspace(0.0, max(xmax, 0.1), 61)
    for ax, el in zip(axes, elinks, strict=True):
        for e in (e for e in entries if e.elinks == el):
            ok, emd = _valid_emd(e)
            if not ok.any():
                continue
            lw = 2.2 if e.name.startswith("ae") else 1.4
            ax.hist(
                np.clip(emd[ok], 0, edges[-1]),
                bins=edges,
                histtype="step",
                density=True,
                lw=lw,
                color=COLOURS.get(e.name),
                label=f"{e.label}: median {np.median(emd[ok]):.2f}",
            )
        ax.set_title(f"{el} e-links")
        ax.set_xlabel("EMD [neighbouring-TC distance = 2 units, 1 unit = 1.21 cm]")
        ax.set_ylabel("wafers (normalised)")
        ax.set_yscale("log")  # best-choice's spike at 0 would flatten every other curve
        ax.legend(fontsize=7)
    fig.suptitle("EMD between input and reconstruction (last bin includes overflow)")
    fig.tight_layout()
    _save(fig, path)


def _binned_median(x: np.ndarray, y: np.ndarray, edges: np.ndarray, min_count: int = 5) -> tuple[np.ndarray, ...]:
    idx = np.digitize(x, edges) - 1
    centres, med, lo, hi = [], [], [], []
    for b in range(len(edges) - 1):
        sel = y[idx == b]
        if sel.size >= min_count:
            p16, p50, p84 = np.percentile(sel, [16, 50, 84])
            centres.append(0.5 * (edges[b] + edges[b + 1]))
            med.append(p50)
            lo.append(p16)
            hi.append(p84)
    return np.array(centres), np.array(med), np.array(lo), np.array(hi)


def plot_emd_vs(entries: list[Entry], x: np.ndarray, edges: np.ndarray, xlabel: str, path: Path, logx: bool) -> None:
    """Median EMD in bins of ``x`` per algorithm; the autoencoders also get their 68% band."""
    elinks = sorted({e.elinks for e in entries})
    fig, axes = _panels(elinks)
    for ax, el in zip(axes, elinks, strict=True):
        for e in (e for e in entries if e.elinks == el):
            ok, emd = _valid_emd(e)
            c, med, lo, hi = _binned_median(x[ok], emd[ok], edges)
            if c.size == 0:
                continue
            colour = COLOURS.get(e.name)
            ax.plot(c, med, "o-" if e.name.startswith("ae") else ".-", color=colour, label=e.label, ms=4)
            if e.name.startswith("ae"):
                ax.fill_between(c, lo, hi, color=colour, alpha=0.15, lw=0)
        if not logx:
            for edge, um in zip(chip.THICKNESS_EDGES[1:-1], chip.THICKNESS_UM[1:], strict=True):
                ax.axvline(edge, color="k", ls=":", lw=0.8)
                ax.text(edge, 1.0, f" {um} um ->", transform=ax.get_xaxis_transform(), va="top", fontsize=7)
        if logx:
            ax.set_xscale("log")
        ax.set_title(f"{el} e-links")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("median EMD")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _hexagons(ax: Any, charges: np.ndarray, norm: Any, cmap: Any) -> Any:
    """Draw one wafer: a hexagon per TC at its centre; empty TCs take the colour map's 'bad' colour."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import RegularPolygon

    # Within a sector, TCs sit on a hexagonal lattice with pitch 2.4168 cm along y:
    # flat-topped hexagons of circumradius pitch / sqrt(3) tile it.
    radius = (2.0 / chip.EMD_COORD_SCALE) / np.sqrt(3.0)
    patches = [RegularPolygon(tuple(xy), 6, radius=radius * 0.97, orientation=np.pi / 6) for xy in chip.TC_XY]
    col = PatchCollection(patches, cmap=cmap, norm=norm, edgecolor="white", linewidth=0.4)
    values = np.ma.masked_less_equal(np.asarray(charges, dtype=np.float64), 0.0)
    col.set_array(values)
    ax.add_collection(col)
    pad = radius * 1.2
    ax.set_xlim(chip.TC_XY[:, 0].min() - pad, chip.TC_XY[:, 0].max() + pad)
    ax.set_ylim(chip.TC_XY[:, 1].min() - pad, chip.TC_XY[:, 1].max() + pad)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return col


def display_indices(sums: np.ndarray) -> np.ndarray:
    """Wafers nearest the DISPLAY_QUANTILES of the wafer sum (distinct, in that order)."""
    order = np.argsort(sums, kind="stable")
    picks = order[np.round(np.array(DISPLAY_QUANTILES) * (sums.size - 1)).astype(int)]
    return np.array(list(dict.fromkeys(picks.tolist())), dtype=np.int64)


def plot_event_display(charges: np.ndarray, shown: list[Entry], path: Path) -> None:
    """Rows: a few wafers across the sum range; columns: the input, then each reconstruction."""
    import matplotlib

    plt = _pyplot()
    rows = display_indices(charges.sum(axis=1))
    ncol = 1 + len(shown)
    fig, axes = plt.subplots(
        len(rows), ncol, figsize=(2.4 * ncol + 1.0, 2.5 * len(rows) + 0.4), squeeze=False, layout="constrained"
    )
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e8e8e8")
    for r, w in enumerate(rows):
        q = charges[w].astype(np.float64)
        vmax = max(q.max(), *(e.reco[w].max() for e in shown), 2.0)
        norm = matplotlib.colors.LogNorm(vmin=1.0, vmax=vmax)
        col = _hexagons(axes[r, 0], q, norm, cmap)
        axes[r, 0].set_title(f"input: sum {int(q.sum())}", fontsize=8)
        for c, e in enumerate(shown, start=1):
            _hexagons(axes[r, c], e.reco[w], norm, cmap)
            emd = e.values["emd"][w]
            what = "empty" if emd < 0 else f"EMD {emd:.2f}"
            axes[r, c].set_title(f"{e.label}\n{what}", fontsize=8)
        fig.colorbar(col, ax=list(axes[r]), fraction=0.03, pad=0.01, label="charge (counts)")
    fig.suptitle(f"Wafers at sum quantiles {', '.join(f'{q:g}' for q in DISPLAY_QUANTILES)} (grey: zero)")
    _save(fig, path)


# ----------------------------------------------------------------------------- the stage


def _ae_entry(name: str, run: Any, wafers: data.Wafers, log: Log) -> Entry:
    m = run.config.model
    label = f"AE {'conditional' if m.conditional else 'plain'} {m.latent_bits}b"
    t0 = time.perf_counter()
    reco = reconstruct(run.encoder(), run.decoder(), wafers)
    seconds = time.perf_counter() - t0
    log(f"  {label} (run {run.run_id}): reconstructed {len(wafers)} wafers in {seconds:.1f} s")
    info = {
        "run": str(run.path),
        "run_id": run.run_id,
        "conditional": m.conditional,
        "latent_bits": m.latent_bits,
        "seconds": seconds,
    }
    return Entry(name, label, m.elinks, reco, info)


def _run_summary(run: Any) -> dict[str, Any]:
    m = run.config.model
    return {
        "path": str(run.path),
        "run_id": run.run_id,
        "elinks": m.elinks,
        "latent_bits": m.latent_bits,
        "conditional": m.conditional,
    }


def evaluate(
    run_dir: Path,
    out_dir: Path | None,
    ablation: Path | None = None,
    n_wafers: int = 0,
    log: Log = print,
) -> dict[str, Any]:
    """Evaluate a run (and optionally a plain-AE ablation run) against the baselines.

    ``n_wafers`` > 0 uses only the first that many test wafers (the split is
    already shuffled). Returns the report written to ``evaluation.json``.
    """
    from . import train

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    if n_wafers < 0:
        raise EcqaeError(f"--wafers must be >= 0, got {n_wafers}")
    t_start = time.perf_counter()
    run = train.load_run(run_dir)
    wafers = run.test_wafers()
    abl = None
    if ablation is not None:
        abl = train.load_run(ablation)
        other = abl.test_wafers()
        same = other.charges.shape == wafers.charges.shape and np.array_equal(other.charges, wafers.charges)
        if not (same and np.array_equal(other.eta, wafers.eta)):
            raise EcqaeError(
                f"{ablation}: its test split differs from that of {run_dir}; train the ablation on the same data "
                "with the same seed so both are judged on the same unseen wafers"
            )
    if n_wafers:
        wafers = wafers.take(np.arange(min(n_wafers, len(wafers))))
    if len(wafers) == 0:
        raise EcqaeError(f"{run_dir / 'test_split.npz'}: no test wafers to evaluate")
    q = wafers.charges.astype(np.int64)
    log(f"evaluate: run {run.run_id}, {len(wafers)} test wafers from {run_dir / 'test_split.npz'}")

    entries = [_ae_entry("ae", run, wafers, log)]
    if abl is not None:
        entries.append(_ae_entry("ae_ablation", abl, wafers, log))
    t0 = time.perf_counter()
    as_float: dict[int, np.ndarray] = {}  # keeps the one STC output shared across budgets
    for b in baselines.run_all(q):
        reco = as_float.setdefault(id(b.reco), b.reco.astype(np.float64))
        entries.append(Entry(b.name, b.label, b.elinks, reco, dict(b.info)))
    log(f"  baselines: {len(entries) - 1 - (abl is not None)} settings in {time.perf_counter() - t0:.1f} s")

    # One metrics pass over every distinct reconstruction (worker processes start once).
    distinct: dict[int, Entry] = {}
    for e in entries:
        distinct.setdefault(id(e.reco), e)
    uniq = list(distinct.values())
    n_pairs = len(uniq) * len(wafers)
    log(f"  metrics: {len(uniq)} distinct reconstructions x {len(wafers)} wafers = {n_pairs:,} wafer pairs")
    t0 = time.perf_counter()
    values = metrics.compute(np.tile(q, (len(uniq), 1)), np.concatenate([e.reco for e in uniq]), log=log)
    t_metrics = time.perf_counter() - t0
    for i, e in enumerate(uniq):
        sl = slice(i * len(wafers), (i + 1) * len(wafers))
        e.values = {k: v[sl] for k, v in values.items()}
    for e in entries:
        e.values = distinct[id(e.reco)].values
    log(f"  metrics: {t_metrics:.1f} s ({n_pairs / max(t_metrics, 1e-9):,.0f} wafer pairs/s)")

    masks = bin_masks(wafers.eta)
    sums = q.sum(axis=1)
    true_occ = metrics.occupancy(q)
    entries.sort(key=lambda e: (e.elinks, not e.name.startswith("ae")))
    report: dict[str, Any] = {
        "run": _run_summary(run),
        "ablation": _run_summary(abl) if abl is not None else None,
        "wafers": {"n": len(wafers), "source": str(run_dir / "test_split.npz"), "data": wafers.source},
        "definitions": DEFINITIONS,
        "eta_bins": eta_bins(),
        "input": {
            k: {
                "n": int(m.sum()),
                "sum": _round(metrics.summarise(sums[m])),
                "occupancy": _round(metrics.summarise(true_occ[m])),
            }
            for k, m in masks.items()
        },
        "results": [
            {
                "name": e.name,
                "label": e.label,
                "elinks": e.elinks,
                "info": _round(e.info),
                "bins": summarise_entry(e, masks),
            }
            for e in entries
        ],
    }

    log("  plots ...")
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_emd_distributions(entries, out_dir / "emd_distributions.png")
    pos = sums[sums > 0]
    sum_edges = np.geomspace(max(pos.min(), 1), pos.max() * 1.0001, 13) if pos.size else np.array([1.0, 2.0])
    sum_label = "wafer charge sum (counts, 35 = 1 MIP_T)"
    plot_emd_vs(entries, sums.astype(np.float64), sum_edges, sum_label, out_dir / "emd_vs_sum.png", logx=True)
    abs_eta = np.abs(wafers.eta.astype(np.float64))
    eta_edges = np.linspace(min(chip.ETA_MIN, abs_eta.min()), max(chip.ETA_MAX, abs_eta.max()), 16)
    plot_emd_vs(entries, abs_eta, eta_edges, "|eta|", out_dir / "emd_vs_eta.png", logx=False)
    shown_names = ("ae", "ae_ablation", "best_choice", "threshold_1.35", "stc")
    shown = [e for e in entries if e.elinks == run.config.model.elinks and e.name in shown_names]
    shown.sort(key=lambda e: shown_names.index(e.name))
    plot_event_display(q, shown, out_dir / "event_display.png")
    t_plots = time.perf_counter() - t0

    report["plots"] = list(PLOTS)
    report["timing"] = _round(
        {
            "metrics_seconds": t_metrics,
            "wafer_pairs": n_pairs,
            "wafer_pairs_per_second": n_pairs / max(t_metrics, 1e-9),
            "plots_seconds": t_plots,
            "total_seconds": time.perf_counter() - t_start,
        }
    )
    table = format_table(report)
    artifacts.write_text(out_dir / "evaluation.txt", table + "\n")
    artifacts.write_json(out_dir / "evaluation.json", report)
    log(table)
    log(f"evaluate: wrote {out_dir} ({report['timing']['total_seconds']:.1f} s)")
    return report
