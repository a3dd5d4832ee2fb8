"""Depth error metrics of the KITTI / Make3D tables (shared PROTOCOLS.md) and their reporting.

Written out rather than taken from a library: the published tables use these exact
definitions (per-image means, then a mean over images), which no library function matches.
"""
from __future__ import annotations

import json
import math
import pathlib

import cv2
import numpy as np

METRIC_NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "a1", "a2", "a3")
# the paper's column titles, in the order of its tables
KITTI_COLUMNS = (("AbsRel", "abs_rel"), ("SqRel", "sq_rel"), ("RMSE", "rmse"),
                 ("RMSElog", "rmse_log"), ("d1", "a1"), ("d2", "a2"), ("d3", "a3"))
MAKE3D_COLUMNS = (("AbsRel", "abs_rel"), ("SqRel", "sq_rel"), ("RMSE", "rmse"), ("log10", "log10"))
# Garg et al. crop as fractions of the image size (rows top/bottom, columns left/right)
GARG_CROP = (0.40810811, 0.99189189, 0.03594771, 0.96405229)


def compute_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """All metrics over the given (already valid, already scaled) values; any shape, flattened."""
    gt = np.asarray(gt, dtype=np.float64).ravel()
    pred = np.asarray(pred, dtype=np.float64).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred differ in size: {gt.size} vs {pred.size}")
    if gt.size == 0:
        raise ValueError("no values to evaluate")
    if not (np.isfinite(gt).all() and np.isfinite(pred).all()):
        raise ValueError("gt or pred holds NaN/inf values")
    if (gt <= 0).any() or (pred <= 0).any():
        raise ValueError("gt and pred must be > 0 (mask invalid pixels, clip predictions)")
    ratio = np.maximum(gt / pred, pred / gt)
    diff = gt - pred
    return {
        "abs_rel": float(np.mean(np.abs(diff) / gt)),
        "sq_rel": float(np.mean(diff ** 2 / gt)),
        "rmse": float(np.sqrt(np.mean(diff ** 2))),
        "rmse_log": float(np.sqrt(np.mean((np.log(gt) - np.log(pred)) ** 2))),
        "log10": float(np.mean(np.abs(np.log10(gt) - np.log10(pred)))),
        "a1": float(np.mean(ratio < 1.25)),
        "a2": float(np.mean(ratio < 1.25 ** 2)),
        "a3": float(np.mean(ratio < 1.25 ** 3)),
    }


def garg_crop_indices(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), integer-truncated: (153, 371, 44, 1197) for 375 x 1242."""
    top, bottom, left, right = GARG_CROP
    return int(top * height), int(bottom * height), int(left * width), int(right * width)


def garg_crop_mask(height: int, width: int) -> np.ndarray:
    """H x W bool, True inside the Garg crop (rows top:bottom, columns left:right)."""
    top, bottom, left, right = garg_crop_indices(height, width)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def median_scale(gt: np.ndarray, pred: np.ndarray) -> float:
    """Per-image median scaling ratio median(gt) / median(pred) over the valid values."""
    med_pred = float(np.median(pred))
    if not med_pred > 0:
        raise ValueError(f"median of the prediction is {med_pred}: cannot median-scale")
    return float(np.median(gt)) / med_pred


def resize_prediction(pred: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an H' x W' depth map to the ground-truth size (OpenCV, as the
    reference code); a map already at that size is returned unchanged."""
    pred = np.asarray(pred, dtype=np.float32)
    pred = pred.reshape(pred.shape[-2:]) if pred.ndim > 2 else pred
    if pred.ndim != 2:
        raise ValueError(f"a prediction must be one H x W depth map, got shape {pred.shape}")
    if pred.shape == (height, width):
        return pred
    return cv2.resize(pred, (width, height), interpolation=cv2.INTER_LINEAR)


def evaluate_frame(gt: np.ndarray, pred: np.ndarray, valid: np.ndarray, *, scaling: str,
                   scale: float, clip: tuple[float, float]) -> tuple[dict[str, float], float]:
    """One image: `pred` (already at gt size) scaled (median per image, or fixed `scale`),
    clipped, compared on `valid` pixels. Returns (metrics, scale ratio used)."""
    g, p = gt[valid].astype(np.float64), pred[valid].astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError("prediction holds NaN/inf on valid ground-truth pixels")
    ratio = median_scale(g, p) if scaling == "median" else float(scale)
    p = np.clip(p * ratio, clip[0], clip[1])
    return compute_metrics(g, p), ratio


def mean_metrics(per_frame: list[dict[str, float]]) -> dict[str, float]:
    """Average of per-image metrics (each image weighs the same, as in the published tables)."""
    if not per_frame:
        raise ValueError("no frames were evaluated")
    return {k: float(np.mean([m[k] for m in per_frame])) for k in METRIC_NAMES}


def ratio_stats(ratios: list[float]) -> dict[str, float]:
    """Median and spread of the per-image scale ratios (std also relative to the median, as
    Monodepth2 prints it)."""
    r = np.asarray(ratios, dtype=np.float64)
    med = float(np.median(r))
    return {"median": med, "std": float(np.std(r)), "std_over_median": float(np.std(r / med)),
            "min": float(r.min()), "max": float(r.max())}


def format_table(metrics: dict[str, float], columns=KITTI_COLUMNS) -> str:
    """Two lines: the paper's column titles and the values to 3 decimals."""
    head = " ".join(f"{title:>8}" for title, _ in columns)
    row = " ".join(f"{metrics[key]:8.3f}" for _, key in columns)
    return f"{head}\n{row}"


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, pathlib.Path):
        return str(value)
    return value


def write_json(result: dict, path: str | pathlib.Path) -> pathlib.Path:
    """Write an evaluation result as JSON (numpy scalars made plain, NaN written as null)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(result), indent=2) + "\n")
    return path
