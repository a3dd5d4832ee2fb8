"""Scale recovery for monocular depth: relative, fixed factor, stereo-trained, or camera height.

`camera_height`: the lower part of the image is mostly road. Back-project it, fit a plane
robustly (RANSAC scored MSAC-style, then least-squares refits on the inliers), and scale =
known height / fitted height. The per-frame scales go through a Kalman filter on log(scale):
each fit's noise comes from its own residuals and inlier count, a fit whose innovation is
implausible (more than `gate` sigmas) is dropped, and after `max_gated` dropped fits in a row
the filter restarts at their median, so a genuine step (a new mount, a loaded car) is followed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from diffsql_model.camera import depth_to_points
from diffsql_model.yaml_config import ConfigError, YamlConfig

SCALE_MODES = ("relative", "fixed", "stereo", "camera_height")
REFITS = 2  # least-squares refits, each on the inliers of the previous plane


@dataclasses.dataclass
class ScaleConfig(YamlConfig):
    mode: str = "relative"
    factor: float = 1.0  # `fixed`: metres per model unit
    # `stereo`: models trained with a stereo partner are metric in the baseline's unit; 1.0 when
    # training used the calibrated baseline in metres (Monodepth2's 0.1-unit baseline needs 5.4).
    stereo_factor: float = 1.0
    camera_height: float = 1.65  # metres above the ground (KITTI: 1.65)
    ground_fraction: float = 0.35  # lower part of the image searched for the ground
    # std of the true log-scale change from one frame to the next (the Kalman process noise):
    # small = steady scale, slow to follow; 0 = a running mean of every accepted fit.
    process_noise: float = 0.003
    gate: float = 3.0  # drop a fit whose innovation exceeds this many sigmas (0: keep every fit)
    max_gated: int = 5  # this many dropped fits in a row restart the filter at their median
    inlier_threshold: float = 0.03  # plane inlier distance, as a fraction of the fitted height
    min_inlier_ratio: float = 0.25
    max_tilt_deg: float = 30.0  # ground normal must be within this of the camera's -y axis
    ransac_iterations: int = 128
    max_points: int = 4000

    def __post_init__(self):
        if self.mode not in SCALE_MODES:
            raise ConfigError(f"scale mode must be one of {SCALE_MODES}, got {self.mode!r}")
        if self.factor <= 0 or self.stereo_factor <= 0 or self.camera_height <= 0:
            raise ConfigError("scale factor, stereo_factor and camera_height must be > 0")
        if not 0 < self.ground_fraction <= 1:
            raise ConfigError(f"need 0 < ground_fraction <= 1, got {self.ground_fraction}")
        if not 0 <= self.process_noise < 1:
            raise ConfigError(f"need 0 <= process_noise < 1 (log-scale std per frame), got {self.process_noise}")
        if self.gate < 0 or self.max_gated < 1:
            raise ConfigError(f"need gate >= 0 and max_gated >= 1, got {self.gate} and {self.max_gated}")
        if not 0 < self.inlier_threshold < 1 or not 0 <= self.min_inlier_ratio <= 1:
            raise ConfigError("need 0 < inlier_threshold < 1 and 0 <= min_inlier_ratio <= 1")
        if self.ransac_iterations < 1 or self.max_points < 50:
            raise ConfigError("need ransac_iterations >= 1 and max_points >= 50")


@dataclasses.dataclass
class GroundFit:
    normal: np.ndarray  # unit, pointing up (n_y < 0): n . p + height = 0 on the ground
    height: float  # camera centre above the plane, in the depth's unit
    inlier_ratio: float
    n_inliers: int
    residual: float  # rms point-to-plane distance of the inliers / height

    @property
    def log_sigma(self) -> float:
        """Noise of log(height) for the filter: the relative residual over the inlier ratio (a
        band that is half cars and kerbs holds less ground than its residual says). Measured on
        the demo's synthetic drives and the KITTI bag: the fits' spread over a drive is 0.4-1.6x this."""
        return self.residual / max(self.inlier_ratio, 0.05)


def fit_ground_plane(points: np.ndarray, cfg: ScaleConfig, rng: np.random.Generator) -> Optional[GroundFit]:
    """points N x 3 (camera optical frame, y down) -> the ground plane, or None when no
    plausible ground (level enough, below the camera, >= min_inlier_ratio inliers) is found."""
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
    # MSAC: truncated squared distance, relative to each hypothesis' height (unit-free). Unlike
    # a plain inlier count it prefers the plane the inliers lie closest to.
    rel = np.abs(points @ normals.T + ds[None, :]) / ds[None, :]  # N x M
    cost = np.minimum(rel, cfg.inlier_threshold) ** 2
    best = int(np.argmin(cost.sum(0)))
    n, d = normals[best], float(ds[best])
    for _ in range(REFITS):
        inliers = np.abs(points @ n + d) < cfg.inlier_threshold * d
        if inliers.sum() < max(cfg.min_inlier_ratio * n_pts, 3):
            return None
        # Least squares: normal = smallest singular vector of the centred inliers.
        p = points[inliers]
        centroid = p.mean(0)
        _, _, vt = np.linalg.svd(p - centroid, full_matrices=False)
        n = vt[-1] if vt[-1][1] < 0 else -vt[-1]
        d = -float(n @ centroid)
        if d <= 0 or -n[1] < cos_tilt:
            return None
    dist = points[inliers] @ n + d
    return GroundFit(n, d, float(inliers.mean()), int(inliers.sum()), float(np.sqrt(np.mean(dist ** 2))) / d)


class LogScaleFilter:
    """Kalman filter on x = log(scale), a random walk of `process_noise` per frame, measured by
    the ground fits; with innovation gating and a restart after `max_gated` gated fits in a row."""

    def __init__(self):
        self.x: Optional[float] = None  # the state; None until a first measurement
        self.var = 0.0
        self.gated = False  # whether the last measurement was dropped by the gate
        self._held: list[float] = []  # the measurements dropped in a row

    def update(self, z: float, sigma: float, cfg: ScaleConfig) -> float:
        """One step with the measurement z (noise sigma) -> the new state."""
        r = sigma ** 2
        self.gated = False
        if self.x is None:
            self.x, self.var = z, r
            return self.x
        var = self.var + cfg.process_noise ** 2  # predict: the scale may have drifted
        innovation = z - self.x
        if cfg.gate > 0 and innovation ** 2 > cfg.gate ** 2 * (var + r):
            self.var, self.gated = var, True
            self._held.append(z)
            if len(self._held) >= cfg.max_gated:  # not outliers: the scale moved
                self.x, self.var = float(np.median(self._held)), r
                self._held = []
            return self.x
        self._held = []
        gain = var / (var + r)
        self.x += gain * innovation
        self.var = (1 - gain) * var
        return self.x


class ScaleEstimator:
    """Per-frame scale factor for the configured mode; `update` returns the scale to apply."""

    def __init__(self, cfg: ScaleConfig, seed: int = 0):
        self.cfg = cfg  # read at every update: runtime parameter changes apply at the next frame
        self._rng = np.random.default_rng(seed)
        self.last_fit: Optional[GroundFit] = None
        self.filter = LogScaleFilter()

    def reset(self):
        self.filter = LogScaleFilter()

    def update(self, depth: np.ndarray, K: Optional[np.ndarray]) -> float:
        """depth HxW in model units (NaN invalid), K 3x3 in its pixels."""
        mode = self.cfg.mode
        if mode == "relative":
            return 1.0
        if mode == "fixed":
            return self.cfg.factor
        if mode == "stereo":
            return self.cfg.stereo_factor
        fit = self._fit(depth, K)
        self.last_fit = fit
        if fit is not None:
            self.filter.update(math.log(self.cfg.camera_height / fit.height), fit.log_sigma, self.cfg)
        # Until a first ground fit succeeds the depth stays in model units.
        return math.exp(self.filter.x) if self.filter.x is not None else 1.0

    def _fit(self, depth: np.ndarray, K: Optional[np.ndarray]) -> Optional[GroundFit]:
        if K is None:
            return None
        h, w = depth.shape
        v0 = int(h * (1 - self.cfg.ground_fraction))
        # Subsample the ground band on a regular grid down to ~max_points pixels.
        step = max(1, int(math.sqrt((h - v0) * w / self.cfg.max_points)))
        pts, _ = depth_to_points(depth, K, step, first_row=v0)
        return fit_ground_plane(pts.astype(np.float64), self.cfg, self._rng)
