"""Pinhole camera geometry on numpy arrays: pixel rays, back-projection of depth, projection.

The single-frame counterpart of geometry.py (torch, batches) with its pixel convention: pixel
(u, v) = (column, row) has its centre at integer coordinates; optical frame x right, y down,
z forward. K is 3x3 in pixels; its skew K[0, 1] is taken as 0, as depth_image_proc does.
A ray is (x/z, y/z) = ((u - cx) / fx, (v - cy) / fy); a point is its ray times the depth z.
"""
from __future__ import annotations

import numpy as np


def pixel_rays(K: np.ndarray, u, v) -> tuple[np.ndarray, np.ndarray]:
    """Pixel columns u and rows v (arrays that broadcast) -> the rays' (x/z, y/z)."""
    return (u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]


def ray_grid(K: np.ndarray, height: int, width: int, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(x/z, y/z) of every `step`-th row and column of a height x width image: two
    ceil(height/step) x ceil(width/step) float32 arrays, row-major (C order)."""
    rx, ry = pixel_rays(K, np.arange(0, width, step, dtype=np.float64), np.arange(0, height, step, dtype=np.float64))
    shape = (ry.size, rx.size)
    # order="C": astype of a broadcast keeps its strides by default, which made rx column-major
    # and each multiply with it ~5x slower.
    return (np.broadcast_to(rx[None, :], shape).astype(np.float32, order="C"),
            np.broadcast_to(ry[:, None], shape).astype(np.float32, order="C"))


def backproject_pixels(K: np.ndarray, u: np.ndarray, v: np.ndarray, z: np.ndarray) -> np.ndarray:
    """N pixel columns u, rows v and depths z -> N x 3 camera points (x, y, z)."""
    rx, ry = pixel_rays(K, u, v)
    return np.stack([rx * z, ry * z, z], axis=1)


def depth_to_points(depth: np.ndarray, K: np.ndarray, stride: int = 1, first_row: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Depth map H x W (NaN, inf and <= 0 invalid) -> (N x 3 camera points, N x 2 integer
    pixel (row, col) each came from), for every `stride`-th row from `first_row` and every
    `stride`-th column, valid pixels only, row-major."""
    h, w = depth.shape
    rows, cols = np.mgrid[first_row:h:stride, 0:w:stride]
    z = depth[first_row::stride, ::stride]
    ok = np.isfinite(z) & (z > 0)
    rows, cols = rows[ok], cols[ok]
    return backproject_pixels(K, cols, rows, z[ok]), np.stack([rows, cols], axis=1)


def project_points(K: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """N x 3 camera points (z > 0) -> their pixel (u, v), in the points' float dtype."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    # Python floats keep float32 points in float32 (a numpy float64 scalar would promote them).
    return float(K[0, 0]) * x / z + float(K[0, 2]), float(K[1, 1]) * y / z + float(K[1, 2])
