"""Synthetic drives as KITTI files: LiDAR-like scans, raw layout, calibration, depth PNGs, splits.

Layout written under `root` (the same as `../shared/data/kitti/`):
  raw/<date>/calib_cam_to_cam.txt, calib_velo_to_cam.txt
  raw/<date>/<drive>/image_02|image_03/data/<frame:010d>.png + timestamps.txt
  raw/<date>/<drive>/velodyne_points/data/<frame:010d>.bin (float32 x, y, z, reflectance)
  depth/train/<drive>/proj_depth/groundtruth/image_02|image_03/<frame:010d>.png (uint16 m*256)
Unlike KITTI depth (which skips the first and last 5 frames), every frame gets ground truth.
The synthetic rig has cam 0 = cam 2 (R_rect_00 = I, P_rect_02 without translation), cam 3 at
+baseline x, and the velodyne at the fixed `T_VELO_TO_CAM`, so `load_kitti_calib` gives back
the renderer's K, baseline and extrinsic exactly.
"""
from __future__ import annotations

import datetime
import pathlib

import cv2
import numpy as np

from ..camera import backproject_pixels
from .synthetic import T_VELO_TO_CAM, Drive, render_drive
from .synthetic_worlds import drive_config

_BASE_TIME = datetime.datetime(2011, 1, 1, 12, 0, 0)


def points_lidar(depth: np.ndarray, K: np.ndarray, T_velo_to_cam: np.ndarray = T_VELO_TO_CAM,
                 rgb: np.ndarray | None = None, num_beams: int = 64,
                 elevation_deg: tuple[float, float] = (-24.8, 2.0), col_step: int = 2) -> np.ndarray:
    """Depth map H x W (0 invalid) -> LiDAR-like scan N x 4 float32 (x fwd, y left, z up, refl).

    Samples `num_beams` image rows at the elevations of a 64-beam scanner (HDL-64E's range,
    measured from the camera: an approximation that keeps every point on a pixel centre) and
    every `col_step`-th column, so projecting a point through `P_velo_to_image` gives back the
    integer pixel it came from. Reflectance is the pixel's grey level (0.5 without `rgb`).
    """
    h, w = depth.shape
    elev = np.deg2rad(np.linspace(elevation_deg[0], elevation_deg[1], num_beams))
    rows = np.unique(np.round(K[1, 2] - K[1, 1] * np.tan(elev)).astype(int))
    rows = rows[(rows >= 0) & (rows < h)]
    cols = np.arange(0, w, col_step)
    vv, uu = np.meshgrid(rows, cols, indexing="ij")
    z = depth[vv, uu].astype(np.float64)
    keep = z > 0
    uu, vv, z = uu[keep], vv[keep], z[keep]
    cam = backproject_pixels(K, uu, vv, z)
    velo = np.linalg.inv(T_velo_to_cam) @ np.vstack([cam.T, np.ones_like(z)])
    refl = rgb[vv, uu].mean(-1) / 255.0 if rgb is not None else np.full(z.shape, 0.5)
    return np.column_stack([velo[:3].T, refl]).astype(np.float32)


def _fmt(a) -> str:
    return " ".join(f"{v:.12e}" for v in np.ravel(a))


def write_calib(date_dir: pathlib.Path, K: np.ndarray, baseline: float, size: tuple[int, int],
                T_velo_to_cam: np.ndarray = T_VELO_TO_CAM) -> None:
    """calib_cam_to_cam.txt (cams 00-03; 00/02 and 01/03 coincide) and calib_velo_to_cam.txt."""
    date_dir.mkdir(parents=True, exist_ok=True)
    lines = ["calib_time: 01-Jan-2011 12:00:00", "corner_dist: 9.950000e-02"]
    for cam in range(4):
        tx = -baseline if cam % 2 else 0.0
        P = K @ np.hstack([np.eye(3), [[tx], [0.0], [0.0]]])
        lines += [f"S_{cam:02d}: {_fmt(size)}", f"K_{cam:02d}: {_fmt(K)}", f"D_{cam:02d}: {_fmt(np.zeros(5))}",
                  f"R_{cam:02d}: {_fmt(np.eye(3))}", f"T_{cam:02d}: {_fmt([tx, 0, 0])}",
                  f"S_rect_{cam:02d}: {_fmt(size)}", f"R_rect_{cam:02d}: {_fmt(np.eye(3))}",
                  f"P_rect_{cam:02d}: {_fmt(P)}"]
    (date_dir / "calib_cam_to_cam.txt").write_text("\n".join(lines) + "\n")
    (date_dir / "calib_velo_to_cam.txt").write_text(
        "calib_time: 01-Jan-2011 12:00:00\n"
        f"R: {_fmt(T_velo_to_cam[:3, :3])}\nT: {_fmt(T_velo_to_cam[:3, 3])}\n"
        "delta_f: 0.000000e+00 0.000000e+00\ndelta_c: 0.000000e+00 0.000000e+00\n")


def _write_timestamps(folder: pathlib.Path, stamps: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = [(_BASE_TIME + datetime.timedelta(seconds=float(s))).strftime("%Y-%m-%d %H:%M:%S.%f") + "000"
            for s in stamps]
    (folder / "timestamps.txt").write_text("\n".join(text) + "\n")


def write_kitti_layout(drive: Drive, root: str | pathlib.Path, date: str = "2011_01_01",
                       drive_name: str | None = None) -> dict[str, pathlib.Path]:
    """Write the drive as KITTI raw + KITTI depth files under `root`; returns the main folders."""
    root = pathlib.Path(root)
    drive_name = drive_name or f"{date}_drive_0001_sync"
    date_dir = root / "raw" / date
    drive_dir = date_dir / drive_name
    depth_dir = root / "depth" / "train" / drive_name / "proj_depth" / "groundtruth"
    h, w = drive.depth.shape[1:]
    write_calib(date_dir, drive.K, drive.baseline, (w, h), drive.T_velo_to_cam)
    for cam, images, depths in (("image_02", drive.rgb, drive.depth),
                                ("image_03", drive.rgb_right, drive.depth_right)):
        (drive_dir / cam / "data").mkdir(parents=True, exist_ok=True)
        (depth_dir / cam).mkdir(parents=True, exist_ok=True)
        _write_timestamps(drive_dir / cam, drive.stamps)
        for i, (img, dep) in enumerate(zip(images, depths)):
            if not cv2.imwrite(str(drive_dir / cam / "data" / f"{i:010d}.png"), img[..., ::-1]):
                raise OSError(f"could not write image for frame {i} under {drive_dir / cam}")
            png = np.round(np.clip(dep, 0, 65535 / 256.0) * 256.0).astype(np.uint16)
            cv2.imwrite(str(depth_dir / cam / f"{i:010d}.png"), png)
    write_poses(drive_dir / "poses.txt", drive.pose)
    velo_dir = drive_dir / "velodyne_points"
    (velo_dir / "data").mkdir(parents=True, exist_ok=True)
    _write_timestamps(velo_dir, drive.stamps)
    for i in range(len(drive.depth)):
        points_lidar(drive.depth[i], drive.K, drive.T_velo_to_cam, drive.rgb[i]).tofile(
            velo_dir / "data" / f"{i:010d}.bin")
    return {"raw": root / "raw", "date_dir": date_dir, "drive_dir": drive_dir,
            "depth_dir": depth_dir}


def write_poses(path: pathlib.Path, poses: np.ndarray) -> None:
    """Left camera-to-world poses, one 3x4 row-major matrix a line (KITTI odometry's format)."""
    np.savetxt(path, poses[:, :3, :].reshape(len(poses), 12), fmt="%.9e")


def read_poses(path: str | pathlib.Path) -> np.ndarray:
    """N x 4 x 4 camera-to-world poses written by `write_poses`."""
    rows = np.loadtxt(path, ndmin=2)
    if rows.shape[1] != 12:
        raise ValueError(f"{path}: expected 12 numbers a line (3x4 pose), got {rows.shape[1]}")
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    poses[:, :3, :] = rows.reshape(-1, 3, 4)
    return poses


DATE = "2011_01_01"


def make_synthetic_kitti(root: str | pathlib.Path, train_seeds=(0, 1, 2, 3), val_seed: int = 100,
                         num_frames: int = 24, width: int = 320, height: int = 96,
                         val_frames: int = 8, world: str = "demo") -> dict[str, str]:
    """Render `train_seeds` drives of `world` (all inner frames are training triplet centres,
    left and right camera) and the held-out drive `val_seed` (its first `val_frames` frames are
    validation frames). Returns the DataConfig fields: root, train_split, val_split, depth_root."""
    root = pathlib.Path(root)
    size = dict(width=width, height=height)
    train_lines = []
    for i, seed in enumerate(train_seeds):
        name = f"{DATE}_drive_{i + 1:04d}_sync"
        write_kitti_layout(render_drive(drive_config(world, seed, num_frames=num_frames, **size)),
                           root, DATE, name)
        train_lines += [f"{DATE}/{name} {f} {side}\n" for f in range(1, num_frames - 1) for side in "lr"]
    val_name = f"{DATE}_drive_0999_sync"
    drive = render_drive(drive_config(world, val_seed, num_frames=max(val_frames, 2), **size))
    write_kitti_layout(drive, root, DATE, val_name)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "train.txt").write_text("".join(train_lines))
    write_split(root / "splits" / "val.txt", DATE, val_name, range(val_frames))
    return {"root": str(root / "raw"), "train_split": str(root / "splits" / "train.txt"),
            "val_split": str(root / "splits" / "val.txt"), "depth_root": str(root / "depth")}


def write_split(path: str | pathlib.Path, date: str, drive_name: str, frames, side: str = "l") -> None:
    """Split file lines `<date>/<drive> <frame> <side>` (KITTI split-list format)."""
    if side not in ("l", "r"):
        raise ValueError(f"side must be 'l' or 'r', got {side!r}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{date}/{drive_name} {int(f)} {side}\n" for f in frames))
