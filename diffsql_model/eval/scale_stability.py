"""Temporal scale stability: does the scale a frame needs stay put from frame to frame?

Per frame, the scale it needs is ratio_t = median(gt) / median(pred) over its valid ground-truth
pixels (metrics.median_scale, on the prediction as it came: unscaled model output for
diffsql-eval, the node's published depth for diffsql-bag-eval). Over a sequence, in frame order:
  ratio_cv      std(ratio) / mean(ratio), population std: how far the scale wanders in all;
  median_change median over t of |ratio_t / ratio_{t-1} - 1|: the typical jump between
                consecutive frames, what a SLAM front-end fusing depth frame to frame sees.
A constant scale factor (scale.mode fixed or stereo) changes neither: both are scale-free.
Frames without ground truth are skipped, so "consecutive" means consecutive evaluated frames.
"""
from __future__ import annotations

import numpy as np


def stability(ratios) -> dict:
    """Ratios of one sequence in frame order -> its stability numbers (fractions, not percent)."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError("scale stability needs the ratios of at least one frame")
    if not (np.isfinite(r).all() and (r > 0).all()):
        raise ValueError("scale ratios must be finite and > 0")
    change = np.abs(r[1:] / r[:-1] - 1)
    return {"n_frames": int(r.size), "ratio_mean": float(r.mean()), "ratio_median": float(np.median(r)),
            "ratio_cv": float(r.std() / r.mean()),
            "median_change": float(np.median(change)) if change.size else None,
            "max_change": float(change.max()) if change.size else None}


def from_per_frame(per_frame: list[dict], key: str = "needed_scale") -> dict:
    """Stability of the per-frame entries of an evaluation result, in their order."""
    return stability([f[key] for f in per_frame])


def format_line(s: dict, label: str = "") -> str:
    """One console line: CV and the median frame-to-frame change in percent."""
    change = "n/a (one frame)" if s["median_change"] is None else f"{100 * s['median_change']:.2f} %"
    head = f"scale stability{f' ({label})' if label else ''} over {s['n_frames']} frames"
    return (f"{head}: ratio median(gt)/median(pred) {s['ratio_median']:.3f}, CV {100 * s['ratio_cv']:.2f} %, "
            f"median frame-to-frame change {change}")
