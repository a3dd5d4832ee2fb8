"""The depth node's per-frame arithmetic without ROS: scale, REP 118 range mask, the point cloud's
validity mask. numpy only."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass
class DepthResult:
    depth: np.ndarray  # H x W float32, scaled; NaN outside [min_depth, max_depth] (REP 118: unknown)
    uncertainty: np.ndarray  # H x W float32, scaled like the depth
    valid: Optional[np.ndarray]  # H x W bool, the pixels the point cloud keeps; None: no cloud


def postprocess(depth: np.ndarray, unc: np.ndarray, scale: float, settings: dict,
                points: bool) -> DepthResult:
    """The estimator's depth and uncertainty -> what the node publishes.

    Works in place on `depth` and `unc` (the estimator's fresh arrays: no copies per frame).
    `scale` multiplies both; depth outside [min_depth, max_depth] becomes NaN. With `points`,
    `valid` keeps depth in [points.min_range, points.max_range] and, where
    points.max_uncertainty > 0, uncertainty <= points.max_uncertainty x depth (NaN never)."""
    if scale != 1.0:
        depth *= scale
        unc *= scale
    bad = depth < settings["min_depth"]
    bad |= depth > settings["max_depth"]
    np.copyto(depth, np.float32(np.nan), where=bad)
    valid = None
    if points:
        valid = depth >= settings["points.min_range"]
        valid &= depth <= settings["points.max_range"]
        if settings["points.max_uncertainty"] > 0:
            valid &= unc <= settings["points.max_uncertainty"] * depth
    return DepthResult(depth, unc, valid)
