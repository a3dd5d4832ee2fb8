"""Ground-truth depth maps: KITTI velodyne scans projected into a camera, and depth PNGs.

The projection follows the KITTI devkit as used by every published Eigen-split table
(see shared PROTOCOLS.md): points with velodyne x >= 0, pixel = round(u) - 1, round(v) - 1
(the devkit is 1-based), nearest point wins per pixel, and the value written is the velodyne
forward distance x ("velo_x", the standard) or, as an option, the camera z ("cam_z").
"""
from __future__ import annotations

import pathlib

import cv2
import numpy as np

from diffsql_model.data.calib import KittiCalib

DEPTH_DEFINITIONS = ("velo_x", "cam_z")


class GroundTruthError(ValueError):
    """A ground-truth file that is unreadable, truncated or of the wrong kind."""


class MissingGroundTruth(GroundTruthError, FileNotFoundError):
    """The ground-truth file of a frame does not exist (protocols list such frames)."""


def read_velodyne_bin(path: str | pathlib.Path) -> np.ndarray:
    """KITTI `.bin` scan -> N x 4 float32 (x, y, z, reflectance), velodyne frame, metres."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingGroundTruth(f"velodyne scan not found: {path}")
    size = path.stat().st_size
    if size == 0 or size % 16:
        raise GroundTruthError(
            f"velodyne scan {path} is truncated or not a KITTI scan: {size} bytes is not a "
            f"positive multiple of 16 (4 float32 per point)"
        )
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(points[:, :3]).all():
        raise GroundTruthError(f"velodyne scan {path} holds non-finite coordinates")
    return points


def splat_nearest(u: np.ndarray, v: np.ndarray, value: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scatter `value` to integer pixels (u, v) -> H x W float32, 0 where nothing lands.

    The smallest value wins where several land on one pixel (the nearest point: a z-buffer).
    u, v: N integer-valued pixel coordinates in the caller's convention; out-of-image or
    non-finite ones are dropped.
    """
    keep = (u >= 0) & (v >= 0) & (u < width) & (v < height) & np.isfinite(u) & np.isfinite(v)
    flat = v[keep].astype(np.int64) * width + u[keep].astype(np.int64)
    value = value[keep]
    # sort by pixel then value, keep each pixel's first (smallest) value
    order = np.lexsort((value, flat))
    flat, value = flat[order], value[order]
    first = np.ones(len(flat), dtype=bool)
    first[1:] = flat[1:] != flat[:-1]
    out = np.zeros(height * width, dtype=np.float32)
    out[flat[first]] = value[first]
    return out.reshape(height, width)


def velodyne_depth_map(
    points: np.ndarray,
    calib: KittiCalib,
    image_size: tuple[int, int] | None = None,
    depth: str = "velo_x",
) -> np.ndarray:
    """Project a scan into `calib`'s rectified camera -> H x W float32 depth, 0 = no point.

    points: N x 3 or N x 4 (velodyne frame). image_size: (width, height) like
    `KittiCalib.image_size` (its default). depth: "velo_x" (standard) or "cam_z".
    """
    if depth not in DEPTH_DEFINITIONS:
        raise ValueError(f"depth must be one of {DEPTH_DEFINITIONS}, got {depth!r}")
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be N x 3 or N x 4, got shape {points.shape}")
    width, height = image_size if image_size is not None else calib.image_size
    xyz = points[points[:, 0] >= 0, :3].astype(np.float64)
    homo = np.concatenate([xyz, np.ones((len(xyz), 1))], axis=1)  # N x 4
    uvw = homo @ calib.P_velo_to_image.T  # N x 3, w = rectified camera-0 z (devkit division)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.round(uvw[:, 0] / uvw[:, 2]) - 1  # devkit: 1-based pixels -> 0-based
        v = np.round(uvw[:, 1] / uvw[:, 2]) - 1
    if depth == "velo_x":
        value = xyz[:, 0]
    else:  # z in this camera's rectified optical frame
        value = (homo @ calib.T_velo_to_cam.T)[:, 2]
    out = splat_nearest(u, v, value, height, width)
    out[out < 0] = 0  # as the devkit-based code: negative values are no measurement
    return out


def read_depth_png(path: str | pathlib.Path) -> np.ndarray:
    """KITTI depth PNG (uint16, metres * 256, 0 = no data) -> H x W float32 metres."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingGroundTruth(f"depth PNG not found: {path}")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise GroundTruthError(f"depth PNG {path} is corrupt or not an image")
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise GroundTruthError(
            f"depth PNG {path} must be single-channel uint16, got {raw.dtype} with shape {raw.shape}"
        )
    return raw.astype(np.float32) / 256.0


def kitti_velodyne_path(raw_root: str | pathlib.Path, folder: str, frame: int) -> pathlib.Path:
    """`<raw_root>/<date>/<drive>/velodyne_points/data/<frame:010d>.bin` (folder = date/drive)."""
    return pathlib.Path(raw_root) / folder / "velodyne_points" / "data" / f"{frame:010d}.bin"
