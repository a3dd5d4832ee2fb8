"""KITTI raw calibration files: intrinsics, rectification and the velodyne extrinsic."""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np


class CalibrationError(ValueError):
    """A calibration file that is missing or lacks a required key."""


def read_calib_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """`key: v1 v2 ...` lines -> float arrays; non-numeric values (calib_time) are skipped."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    out: dict[str, np.ndarray] = {}
    for line in path.read_text().splitlines():
        if ":" not in line:
            continue
        key, value = line.split(":", 1)
        try:
            out[key.strip()] = np.array([float(v) for v in value.split()], dtype=np.float64)
        except ValueError:
            continue
    return out


def _need(calib: dict, key: str, size: int, path) -> np.ndarray:
    if key not in calib or calib[key].size != size:
        raise CalibrationError(f"{path}: missing or malformed key {key!r}")
    return calib[key]


@dataclasses.dataclass(frozen=True)
class KittiCalib:
    """Calibration of one rectified KITTI camera (2 = left colour, 3 = right colour)."""

    cam: int
    P_rect: np.ndarray  # 3x4, rectified projection of this camera
    R_rect: np.ndarray  # 4x4, rectifying rotation of cam 0
    T_velo_to_cam0: np.ndarray  # 4x4, velodyne -> unrectified cam 0
    image_size: tuple[int, int]  # (width, height) of the rectified image

    @property
    def K(self) -> np.ndarray:
        return self.P_rect[:, :3].copy()

    @property
    def P_velo_to_image(self) -> np.ndarray:
        """3x4 = P_rect @ R_rect @ T_velo_to_cam0: the devkit's velodyne -> pixel projection."""
        return self.P_rect @ self.R_rect @ self.T_velo_to_cam0

    @property
    def T_cam0rect_to_cam(self) -> np.ndarray:
        """4x4 translation from rectified cam 0 into this rectified camera: t = K^-1 P[:, 3]."""
        T = np.eye(4)
        T[:3, 3] = np.linalg.solve(self.K, self.P_rect[:, 3])
        return T

    @property
    def T_velo_to_cam(self) -> np.ndarray:
        """4x4 velodyne -> this camera's rectified optical frame; K @ (T X)[:3] == P_velo_to_image X."""
        return self.T_cam0rect_to_cam @ self.R_rect @ self.T_velo_to_cam0


def load_kitti_calib(date_dir: str | pathlib.Path, cam: int = 2) -> KittiCalib:
    """Read `calib_cam_to_cam.txt` and `calib_velo_to_cam.txt` of one KITTI recording day."""
    date_dir = pathlib.Path(date_dir)
    c2c_path = date_dir / "calib_cam_to_cam.txt"
    v2c_path = date_dir / "calib_velo_to_cam.txt"
    c2c = read_calib_file(c2c_path)
    v2c = read_calib_file(v2c_path)
    P = _need(c2c, f"P_rect_0{cam}", 12, c2c_path).reshape(3, 4)
    R = np.eye(4)
    R[:3, :3] = _need(c2c, "R_rect_00", 9, c2c_path).reshape(3, 3)
    size = _need(c2c, f"S_rect_0{cam}", 2, c2c_path)
    T = np.eye(4)
    T[:3, :3] = _need(v2c, "R", 9, v2c_path).reshape(3, 3)
    T[:3, 3] = _need(v2c, "T", 3, v2c_path)
    return KittiCalib(cam, P, R, T, (int(size[0]), int(size[1])))


def stereo_baseline(date_dir: str | pathlib.Path) -> float:
    """Distance in metres between the rectified colour cameras 2 and 3 (0.54 m on KITTI)."""
    left, right = load_kitti_calib(date_dir, 2), load_kitti_calib(date_dir, 3)
    return float(np.linalg.norm(left.T_cam0rect_to_cam[:3, 3] - right.T_cam0rect_to_cam[:3, 3]))
