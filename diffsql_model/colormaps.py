"""Colour maps of depth and uncertainty: the node's `depth/colored`, report pictures, TensorBoard.

One table per map (OpenCV's turbo, magma and viridis, 256 entries) looked up with one
cv2.applyColorMap pass: a user table is one SIMD lookup, ~3x faster than three 1-channel
cv2.LUT + merge (measured at 640x192, same bytes). Colours come out RGB (ROS rgb8, TensorBoard)
or, with bgr=True, BGR (cv2.imwrite). Invalid pixels (NaN, and depth <= 0) are black.
"""
from __future__ import annotations

import functools
from typing import Optional

import cv2
import numpy as np

_CV2_MAPS = {"turbo": cv2.COLORMAP_TURBO, "magma": cv2.COLORMAP_MAGMA, "viridis": cv2.COLORMAP_VIRIDIS}
COLORMAPS = tuple(_CV2_MAPS)


@functools.lru_cache(maxsize=None)
def colormap_table(name: str, bgr: bool = False, black_zero: bool = False) -> np.ndarray:
    """256 x 1 x 3 uint8 table of map `name` for cv2.applyColorMap (read-only); black_zero
    reserves index 0 for invalid pixels."""
    if name not in _CV2_MAPS:
        raise ValueError(f"colour map must be one of {COLORMAPS}, got {name!r}")
    table = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], _CV2_MAPS[name])  # BGR
    table = np.ascontiguousarray(table if bgr else table[:, :, ::-1])
    if black_zero:
        table[0] = 0
    table.flags.writeable = False
    return table


def apply_colormap(index: np.ndarray, name: str, bgr: bool = False) -> np.ndarray:
    """uint8 indices (any shape, 0 = low end) -> colours, shape + (3,) uint8."""
    out = cv2.applyColorMap(np.ascontiguousarray(index, np.uint8).reshape(index.shape[0], -1),
                            colormap_table(name, bgr))
    return out.reshape(index.shape + (3,))


def range_index(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values -> uint8 0..255 linear over [lo, hi], clipped; a zero span maps everything to lo."""
    span = max(hi - lo, 1e-12)
    return (np.clip((values - lo) / span, 0.0, 1.0) * 255).astype(np.uint8)


def _percentile_range(values: np.ndarray, lo: Optional[float], hi: Optional[float]) -> tuple[float, float]:
    """lo and hi as given, else the 1st and 99th percentile of `values`."""
    return (float(lo) if lo is not None else float(np.percentile(values, 1)),
            float(hi) if hi is not None else float(np.percentile(values, 99)))


def colorize_inverse_depth(depth: np.ndarray, min_depth: float, max_depth: float,
                           bgr: bool = False) -> np.ndarray:
    """H x W metres -> H x W x 3 uint8 turbo map of inverse depth over [min_depth, max_depth]
    (near = warm, NaN black): the node's `depth/colored`."""
    lo, hi = 1.0 / max_depth, 1.0 / min_depth
    # Inverse depth spreads the near range, where robots act; 1..255 valid, NaN -> 0 -> black.
    inv = np.reciprocal(np.clip(depth, min_depth, max_depth), dtype=np.float32)
    inv -= lo
    inv *= 254.0 / (hi - lo)
    inv += 1.0
    cv2.patchNaNs(inv, 0.0)  # NaN -> 0 (finite values are >= 1 after the clip): 3x np.fmax
    idx = inv.astype(np.uint8)
    return cv2.applyColorMap(idx, colormap_table("turbo", bgr, black_zero=True))


def depth_picture_bgr(depth: np.ndarray, min_depth: Optional[float] = None,
                      max_depth: Optional[float] = None) -> np.ndarray:
    """H x W metres -> H x W x 3 BGR uint8: `colorize_inverse_depth` with depth <= 0 black too,
    over [min_depth, max_depth], by default the 1st..99th percentile of the valid depth."""
    depth = np.asarray(depth, dtype=np.float32)
    valid = np.isfinite(depth) & (depth > 0)
    if not valid.any():
        return np.zeros(depth.shape + (3,), np.uint8)
    lo, hi = _percentile_range(depth[valid], min_depth, max_depth)
    lo = max(lo, 1e-3)
    hi = max(hi, lo * 1.001)  # a flat map still needs a range
    return colorize_inverse_depth(np.where(valid, depth, np.float32(np.nan)), lo, hi, bgr=True)


def colorize_percentiles(values: np.ndarray, name: str, lo: Optional[float] = None,
                         hi: Optional[float] = None, bgr: bool = False) -> np.ndarray:
    """H x W values -> H x W x 3 uint8 map `name` over [lo, hi], by default the 1st..99th
    percentile of the finite values; NaN and inf black."""
    values = np.asarray(values, dtype=np.float32)
    valid = np.isfinite(values)
    if not valid.any():
        return np.zeros(values.shape + (3,), np.uint8)
    lo, hi = _percentile_range(values[valid], lo, hi)
    out = apply_colormap(range_index(np.where(valid, values, np.float32(lo)), lo, hi), name, bgr)
    out[~valid] = 0
    return out


def uncertainty_picture_bgr(unc: np.ndarray, max_value: Optional[float] = None) -> np.ndarray:
    """H x W std in metres -> BGR uint8 viridis over the 1st..99th percentile, or [0, max_value]."""
    return colorize_percentiles(unc, "viridis", None if max_value is None else 0.0, max_value, bgr=True)
