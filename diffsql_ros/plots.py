"""Small PNG plots for the HTML reports: learning curve, sparsification curves, per-frame scale
ratio, latency histogram. Each returns PNG bytes (report.Figure embeds them in the page).

matplotlib's object API on the Agg canvas (no pyplot): no display, no process-wide backend
switch, no figure registry to leak. numpy and matplotlib only, no ROS.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

SIZE = (5.6, 3.2)  # inches at 100 dpi: 560 x 320 px, legible at the page's width
DPI = 100


def _axes(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=SIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def learning_curve(points: Sequence[tuple], target: Optional[float] = None, best_step: Optional[int] = None) -> bytes:
    """points [(step, validation AbsRel)] -> the curve, the target as a dashed line."""
    if not points:
        raise ValueError("a learning curve needs at least one (step, value) point")
    steps, values = zip(*points)
    fig, ax = _axes("Validation AbsRel while training", "training step", "AbsRel (lower is better)")
    ax.plot(steps, values, "o-", ms=3, lw=1.2, label="validation drive")
    if target is not None:
        ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"target {target:g}")
    if best_step is not None and best_step in steps:
        ax.plot([best_step], [values[steps.index(best_step)]], "*", ms=11, color="tab:green",
                label="checkpoint used")
    ax.legend(fontsize=8)
    return _png(fig)


def sparsification_curves(unc: dict, metric: str = "abs_rel", title: str = "") -> bytes:
    """A mean_over_frames result -> the metric of the pixels kept against the fraction removed:
    the model ranked by std and by std / depth, the oracle and random removal."""
    x = 100 * np.asarray(unc["fractions"])
    label = {"abs_rel": "AbsRel", "rmse": "RMSE (m)"}[metric]
    fig, ax = _axes(title or f"Sparsification ({label}, {unc['n_frames']} frames)", "pixels removed (%), most uncertain first",
                    f"{label} of the pixels kept")
    for rank, style in (("std", "-"), ("std_over_depth", "-.")):
        r = unc[rank][metric]
        ax.plot(x, r["curve"], style, lw=1.5,
                label=f"ranked by {rank.replace('_over_', '/')} (AUSE {r['ause']:.3f}, AURG {r['aurg']:+.3f})")
    ax.plot(x, unc["std"][metric]["oracle"], color="black", lw=1.2, label="oracle (true error)")
    ax.plot(x, unc["std"][metric]["random"], color="grey", ls="--", lw=1.2, label="random (expected)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return _png(fig)


def scale_ratios(series: dict) -> bytes:
    """{label: [ratio per frame, in order]} -> median(gt) / median(pred) against the frame index,
    one line per run (each normalised by its own median, so runs of other units compare)."""
    if not any(len(v) for v in series.values()):
        raise ValueError("no per-frame scale ratios to plot")
    fig, ax = _axes("Scale each frame needs, over the sequence", "frame",
                    "median(gt) / median(pred), / run median")
    for name, ratios in series.items():
        r = np.asarray(ratios, dtype=np.float64)
        if r.size:
            ax.plot(np.arange(r.size), r / np.median(r), "o-", ms=3, lw=1.2, label=name)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    return _png(fig)


def latency_histogram(series: dict) -> bytes:
    """{label: [latency ms per frame]} -> overlaid histograms on shared bins."""
    values = [np.asarray(v, dtype=np.float64) for v in series.values() if len(v)]
    if not values:
        raise ValueError("no latencies to plot")
    bins = np.linspace(min(v.min() for v in values), max(v.max() for v in values), 25)
    fig, ax = _axes("Latency: image published -> depth received", "milliseconds", "frames")
    for name, v in series.items():
        if len(v):
            ax.hist(v, bins=bins, alpha=0.6, label=f"{name} (p50 {np.median(v):.0f} ms)")
    ax.legend(fontsize=8)
    return _png(fig)
