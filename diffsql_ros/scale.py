"""Scale recovery for monocular depth: relative, fixed factor, stereo-trained, or camera height.

`camera_height`: the lower part of the image is mostly road. Back-project it, fit a plane
robustly (RANSAC + least-squares refit on the inliers), and scale = known height / fitted
height, smoothed over time in log space so one bad frame cannot jerk the scale.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from diffsql_model.camera import depth_to_points
from diffsql_model.yaml_config import ConfigError, YamlConfig

SCALE_MODES = ("relative", "fixed", "stereo", "camera_height")


@dataclasses.dataclass
class ScaleConfig(YamlConfig):
    mode: str = "relative"
    factor: float = 1.0  # `fixed`: metres per model unit
    # `stereo`: models trained with a stereo partner are metric in the baseline's unit; 1.0 when
    # training used the calibrated baseline in metres (Monodepth2's 0.1-unit baseline needs 5.4).
    stereo_factor: float = 1.0
    camera_height: float = 1.65  # metres above the ground (KITTI: 1.65)
    ground_fraction: float = 0.35  # lower part of the image searched for the ground
    smoothing: float = 0.9  # weight of the previous scale (0: no smoothing)
    inlier_threshold: float = 0.02  # plane inlier distance, as a fraction of the fitted height
    min_inlier_ratio: float = 0.3
    max_tilt_deg: float = 30.0  # ground normal must be within this of the camera's -y axis
    ransac_iterations: int = 64
    max_points: int = 4000

    def __post_init__(self):
        if self.mode not in SCALE_MODES:
            raise ConfigError(f"scale mode must be one of {SCALE_MODES}, got {self.mode!r}")
        if self.factor <= 0 or self.stereo_factor <= 0 or self.camera_height <= 0:
            raise ConfigError("scale factor, stereo_factor and camera_height must be > 0")
        if not 0 < self.ground_fraction <= 1 or not 0 <= self.smoothing < 1:
            raise ConfigError("need 0 < ground_fraction <= 1 and 0 <= smoothing < 1")


def fit_ground_plane(points: np.ndarray, cfg: ScaleConfig, rng: np.random.Generator
                     ) -> Optional[tuple[np.ndarray, float, float]]:
    """points N x 3 (camera optical frame, y down) -> (unit normal n, d, inlier ratio) with
    n . p + d = 0 and n pointing up (n_y < 0), or None when no plausible ground is found."""
    n_pts = points.shape[0]
    if n_pts < 50:
        return None
    cos_tilt = math.cos(math.radians(cfg.max_tilt_deg))
    idx = rng.integers(0, n_pts, size=(cfg.ransac_iterations, 3))
    a, b, c = points[idx[:, 0]], points[idx[:, 1]], points[idx[:, 2]]
    normals = np.cross(b - a, c - a)
    norm = np.linalg.norm(normals, axis=1)
    good = norm > 1e-12
    if not good.any():
        return None
    normals = normals[good] / norm[good, None]
    normals *= -np.sign(normals[:, 1:2] + 1e-12)  # make n_y < 0 (up)
    ds = -np.einsum("ij,ij->i", normals, a[good])
    plausible = (-normals[:, 1] >= cos_tilt) & (ds > 0)  # ground below the camera
    if not plausible.any():
        return None
    normals, ds = normals[plausible], ds[plausible]
    # Inlier threshold scales with each hypothesis' height, so the test is unit-free.
    dist = np.abs(points @ normals.T + ds[None, :])  # N x M
    counts = (dist < cfg.inlier_threshold * ds[None, :]).sum(0)
    best = int(np.argmax(counts))
    inliers = dist[:, best] < cfg.inlier_threshold * ds[best]
    if inliers.sum() < max(cfg.min_inlier_ratio * n_pts, 3):
        return None
    # Least-squares refit: normal = smallest singular vector of the centred inliers.
    p = points[inliers]
    centroid = p.mean(0)
    _, _, vt = np.linalg.svd(p - centroid, full_matrices=False)
    n = vt[-1]
    if n[1] > 0:
        n = -n
    d = -float(n @ centroid)
    if d <= 0 or -n[1] < cos_tilt:
        return None
    return n, d, float(inliers.mean())


class ScaleEstimator:
    """Per-frame scale factor for the configured mode; `update` returns the scale to apply."""

    def __init__(self, cfg: ScaleConfig, seed: int = 0):
        self.cfg = cfg
        self._rng = np.random.default_rng(seed)
        self._log_scale: Optional[float] = None
        self.last_fit: Optional[tuple[np.ndarray, float, float]] = None

    def reset(self):
        self._log_scale = None

    def update(self, depth: np.ndarray, K: Optional[np.ndarray]) -> float:
        """depth HxW in model units (NaN invalid), K 3x3 in its pixels."""
        mode = self.cfg.mode
        if mode == "relative":
            return 1.0
        if mode == "fixed":
            return self.cfg.factor
        if mode == "stereo":
            return self.cfg.stereo_factor
        scale = self._camera_height_scale(depth, K)
        if scale is not None:
            a = self.cfg.smoothing if self._log_scale is not None else 0.0
            prev = self._log_scale if self._log_scale is not None else 0.0
            self._log_scale = a * prev + (1 - a) * math.log(scale)
        # Until a first ground fit succeeds the depth stays in model units.
        return math.exp(self._log_scale) if self._log_scale is not None else 1.0

    def _camera_height_scale(self, depth: np.ndarray, K: Optional[np.ndarray]) -> Optional[float]:
        if K is None:
            return None
        h, w = depth.shape
        v0 = int(h * (1 - self.cfg.ground_fraction))
        # Subsample the ground band on a regular grid down to ~max_points pixels.
        step = max(1, int(math.sqrt((h - v0) * w / self.cfg.max_points)))
        pts, _ = depth_to_points(depth, K, step, first_row=v0)
        fit = fit_ground_plane(pts.astype(np.float64), self.cfg, self._rng)
        self.last_fit = fit
        if fit is None:
            return None
        return self.cfg.camera_height / fit[1]
