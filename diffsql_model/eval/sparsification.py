"""Sparsification: does the uncertainty know where the depth is wrong? (AUSE, AURG of Poggi et
al., CVPR 2020, "On the uncertainty of self-supervised monocular depth estimation").

Remove the most uncertain pixels of a frame, a fraction at a time, and follow the metric of the
pixels that stay. Two references:
- the oracle removes pixels by their true error: no ranking does better;
- random removal: its expected curve is flat at the full-set value, since a uniformly random
  subset's mean error has the whole set's mean as its expectation (RMSE: its mean squared error).

Area convention, that of the paper's published numbers (mattpoggi/mono-uncertainty evaluate.py):
fractions k/K removed (k = 0..K-1, K = 50), then a last point 0 at fraction 1 (nothing left),
trapezoids over the removed fraction in [0, 1]; the random curve's area is the full-set value.
Curves are not normalised: AbsRel areas are unitless, RMSE areas in metres.
  AUSE = area(model) - area(oracle)   >= 0, lower is better (0: ranks like the true error)
  AURG = area(random) - area(model)   higher is better; < 0: worse than removing at random
The last trapezoid makes a ranking no better than random score AURG = full / (2K) (0.01 x the
full-set value at K = 50), not 0. Each frame is scored on its own, then AUSE and AURG (and the
curves, for plots) are averaged over frames, each frame weighing the same, as in the paper.

Ties in a ranking (a constant uncertainty, a quantised map) are broken at random in expectation:
every pixel of a group of equal ranks counts with its group's mean error, so pixel order never
decides. Inputs are the frame's valid pixels, 1-D, the prediction already scaled and clipped.
"""
from __future__ import annotations

import numpy as np

FRACTIONS = np.arange(50) / 50  # removed fractions 0, 0.02, ..., 0.98 (the paper's 50 intervals)
METRICS = ("abs_rel", "rmse")
RANKINGS = ("std", "std_over_depth")  # uncertainty as published (metres), and relative to depth


def check_fractions(fractions) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or f.size < 2 or f[0] != 0 or not (np.diff(f) > 0).all() or f[-1] >= 1:
        raise ValueError(f"fractions must increase from 0 and stay below 1, got {f.tolist()}")
    return f


def pixel_errors(gt: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel terms whose mean makes each metric: abs_rel |d - d*| / d*; rmse (d - d*)^2
    (the curve takes the square root of the mean)."""
    gt, pred = np.asarray(gt, np.float64), np.asarray(pred, np.float64)
    return {"abs_rel": np.abs(pred - gt) / gt, "rmse": (pred - gt) ** 2}


def removal_curve(error: np.ndarray, ranking: np.ndarray, fractions=FRACTIONS) -> np.ndarray:
    """Mean `error` of the pixels kept after removing the floor(f N) highest-`ranking` pixels,
    for each removed fraction f (at least one pixel always stays). Ties: see the module doc."""
    error, ranking = np.asarray(error, np.float64).ravel(), np.asarray(ranking, np.float64).ravel()
    f = check_fractions(fractions)
    n = error.size
    if n == 0 or ranking.size != n:
        raise ValueError(f"need as many ranks as errors (> 0), got {ranking.size} and {n}")
    if not (np.isfinite(ranking).all() and np.isfinite(error).all()):
        raise ValueError("uncertainty (ranking) or error holds NaN/inf values")
    order = np.argsort(-ranking, kind="stable")  # most uncertain first
    e, r = error[order], ranking[order]
    starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])  # first index of each tie group
    counts = np.diff(np.r_[starts, n])
    e = np.repeat(np.add.reduceat(e, starts) / counts, counts)
    kept_sum = np.cumsum(e[::-1])[::-1]  # kept_sum[k]: sum over the pixels from rank k on
    removed = np.minimum(np.floor(f * n + 1e-9).astype(np.int64), n - 1)
    return kept_sum[removed] / (n - removed)


def area(curve: np.ndarray, fractions=FRACTIONS) -> float:
    """Trapezoids over the removed fraction, the curve closed by 0 at fraction 1 (the paper's)."""
    x = np.r_[check_fractions(fractions), 1.0]
    y = np.r_[np.asarray(curve, np.float64), 0.0]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def metric_curves(gt: np.ndarray, pred: np.ndarray, ranking: np.ndarray, fractions=FRACTIONS) -> dict:
    """One frame, one ranking -> {metric: {"curve", "oracle", "random" (arrays over the fractions),
    "ause", "aurg"}} for AbsRel and RMSE."""
    out = {}
    for name, err in pixel_errors(gt, pred).items():
        curve, oracle = removal_curve(err, ranking, fractions), removal_curve(err, err, fractions)
        if name == "rmse":
            curve, oracle = np.sqrt(curve), np.sqrt(oracle)
        full = float(curve[0])  # nothing removed: the frame's metric
        out[name] = {"curve": curve, "oracle": oracle, "random": np.full_like(curve, full),
                     "ause": area(curve, fractions) - area(oracle, fractions), "aurg": full - area(curve, fractions)}
    return out


def rankings(uncertainty: np.ndarray, depth: np.ndarray) -> dict[str, np.ndarray]:
    """The rankings scored: the uncertainty as published (std, metres) and std / depth. Both are
    scale-free within a frame, so median or fixed scaling ranks the same pixels the same."""
    u, d = np.asarray(uncertainty, np.float64), np.asarray(depth, np.float64)
    if not (np.isfinite(u).all() and np.isfinite(d).all() and (d > 0).all()):
        raise ValueError("uncertainty holds NaN/inf values or depth is not > 0 on valid ground-truth pixels")
    return {"std": u, "std_over_depth": u / d}


def frame_sparsification(gt, pred, uncertainty, fractions=FRACTIONS) -> dict:
    """One frame's valid pixels (1-D gt, scaled + clipped prediction, uncertainty) ->
    {ranking: metric_curves(...)}."""
    ranks = rankings(uncertainty, pred)
    return {name: metric_curves(gt, pred, r, fractions) for name, r in ranks.items()}


def mean_over_frames(frames: list[dict], fractions=FRACTIONS) -> dict:
    """Per-frame frame_sparsification results -> the same layout averaged over frames (AUSE,
    AURG and every curve point: each frame weighs the same), with plain lists for JSON.
    By linearity, the mean AUSE is also the area between the mean model and oracle curves."""
    if not frames:
        raise ValueError("no frames with uncertainty were evaluated")
    out = {"fractions": check_fractions(fractions).tolist(), "n_frames": len(frames),
           "convention": "Poggi et al. CVPR 2020: trapezoids over removed fraction [0, 1], curve closed by 0 "
                         "at 1, random area = full-set value; per frame, mean over frames"}
    for rank in frames[0]:
        out[rank] = {}
        for metric in METRICS:
            per = [f[rank][metric] for f in frames]
            out[rank][metric] = {
                "ause": float(np.mean([p["ause"] for p in per])), "aurg": float(np.mean([p["aurg"] for p in per])),
                **{k: np.mean([p[k] for p in per], axis=0).tolist() for k in ("curve", "oracle", "random")}}
    return out


def frame_summary(result: dict) -> dict:
    """A frame's result without its curves (what the JSON lists per frame)."""
    return {rank: {m: {"ause": v[m]["ause"], "aurg": v[m]["aurg"]} for m in METRICS} for rank, v in result.items()}


def format_table(unc: dict) -> str:
    """mean_over_frames result -> console table, one row per ranking (both evaluators print it)."""
    heads = ("AbsRel AUSE", "AbsRel AURG", "RMSE AUSE", "RMSE AURG")
    lines = [f"uncertainty: sparsification over {len(unc['fractions'])} steps (AUSE lower, AURG higher is better; "
             f"AURG < 0: worse than random), mean over {unc['n_frames']} frames",
             f"{'ranked by':>10} " + " ".join(f"{h:>11}" for h in heads)]
    for rank in RANKINGS:
        r = unc[rank]
        values = (r["abs_rel"]["ause"], r["abs_rel"]["aurg"], r["rmse"]["ause"], r["rmse"]["aurg"])
        lines.append(f"{rank.replace('_over_', '/'):>10} " + " ".join(f"{v:11.3f}" for v in values))
    return "\n".join(lines)
