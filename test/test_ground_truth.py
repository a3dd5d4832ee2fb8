"""Velodyne -> depth map on the real KITTI scans, checked against KITTI's improved ground truth."""
import shutil

import cv2
import numpy as np
import pytest

from diffsql_model.data import ground_truth
from diffsql_model.data.calib import CalibrationError, load_kitti_calib

DRIVE = "2011_09_26/2011_09_26_drive_0001_sync"
FRAMES = (5, 25, 45, 65, 85)


@pytest.fixture(scope="module")
def calib(kitti_raw):
    return load_kitti_calib(kitti_raw / "2011_09_26", 2)


def scan(kitti_raw, frame):
    return ground_truth.read_velodyne_bin(ground_truth.kitti_velodyne_path(kitti_raw, DRIVE, frame))


def improved(kitti_depth, frame):
    return ground_truth.read_depth_png(kitti_depth / "train" / DRIVE.split("/")[1] / "proj_depth" / "groundtruth"
                            / "image_02" / f"{frame:010d}.png")


def test_read_velodyne_bin(kitti_raw):
    points = scan(kitti_raw, 5)
    path = ground_truth.kitti_velodyne_path(kitti_raw, DRIVE, 5)
    assert points.dtype == np.float32 and points.shape == (path.stat().st_size // 16, 4)
    assert 100_000 < len(points) < 140_000  # ~121k points a scan (data README)
    assert np.abs(points[:, :3]).max() < 130 and 0 <= points[:, 3].min() and points[:, 3].max() <= 1


def test_truncated_and_missing_scans(kitti_raw, tmp_path):
    src = ground_truth.kitti_velodyne_path(kitti_raw, DRIVE, 5)
    bad = tmp_path / "cut.bin"
    bad.write_bytes(src.read_bytes()[:16 * 1000 + 7])
    with pytest.raises(ground_truth.GroundTruthError, match="truncated"):
        ground_truth.read_velodyne_bin(bad)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ground_truth.GroundTruthError, match="truncated"):
        ground_truth.read_velodyne_bin(tmp_path / "empty.bin")
    with pytest.raises(ground_truth.MissingGroundTruth, match="not found"):
        ground_truth.read_velodyne_bin(tmp_path / "nope.bin")


def test_missing_calibration_is_clear_error(kitti_raw, tmp_path):
    with pytest.raises(CalibrationError, match="calib_cam_to_cam.txt"):
        load_kitti_calib(tmp_path, 2)
    shutil.copy(kitti_raw / "2011_09_26" / "calib_cam_to_cam.txt", tmp_path)
    with pytest.raises(CalibrationError, match="calib_velo_to_cam.txt"):
        load_kitti_calib(tmp_path, 2)


def test_pixel_convention_and_value(calib):
    # a point whose exact projection is (u, v) = (100, 200) lands on column 99, row 199 (1-based devkit)
    A = calib.P_velo_to_image
    w = 20.0
    X = np.linalg.solve(A[:, :3], w * np.array([100.0, 200.0, 1.0]) - A[:, 3])
    depth = ground_truth.velodyne_depth_map(X[None], calib)
    assert depth.shape == (375, 1242)
    rows, cols = np.nonzero(depth)
    assert (rows.tolist(), cols.tolist()) == ([199], [99])
    assert depth[199, 99] == pytest.approx(X[0], rel=1e-6)  # velodyne forward x
    cam_z = ground_truth.velodyne_depth_map(X[None], calib, depth="cam_z")[199, 99]
    assert cam_z == pytest.approx((calib.T_velo_to_cam @ np.append(X, 1))[2], rel=1e-6)
    # a point behind the velodyne (x < 0) whose projection falls inside the image is dropped
    behind = np.linalg.solve(A[:, :3], -0.5 * np.array([100.0, 200.0, 1.0]) - A[:, 3])
    assert behind[0] < 0
    assert not ground_truth.velodyne_depth_map(behind[None], calib).any()
    with pytest.raises(ValueError, match="depth must be"):
        ground_truth.velodyne_depth_map(X[None], calib, depth="range")


def test_nearest_point_wins(calib):
    A = calib.P_velo_to_image
    centre = -np.linalg.solve(A[:, :3], A[:, 3])  # camera centre in velodyne coordinates (P @ C = 0)
    X = np.linalg.solve(A[:, :3], 15.0 * np.array([600.0, 180.0, 1.0]) - A[:, 3])
    far = centre + 2.0 * (X - centre)  # same ray, twice as far: same pixel
    for points in (np.stack([X, far]), np.stack([far, X])):
        depth = ground_truth.velodyne_depth_map(points, calib)
        assert np.count_nonzero(depth) == 1 and depth[179, 599] == pytest.approx(X[0], rel=1e-6)


def test_splat_nearest_by_hand():
    u = np.array([1, 1, 0, 3, -1, 2, np.nan])
    v = np.array([0, 0, 1, 0, 0, 2, 0])  # (1,0) twice; (3,0), (-1,0), (2,2) outside a 3 x 2 image
    value = np.array([5.0, 2.0, 7.0, 1.0, 1.0, 1.0, 1.0])
    out = ground_truth.splat_nearest(u, v, value, height=2, width=3)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[0, 2, 0], [7, 0, 0]])


@pytest.mark.parametrize("frame", FRAMES)
def test_velodyne_gt_matches_improved_gt(kitti_raw, kitti_depth, calib, frame):
    points = scan(kitti_raw, frame)
    velo_x = ground_truth.velodyne_depth_map(points, calib)
    cam_z = ground_truth.velodyne_depth_map(points, calib, depth="cam_z")
    png = improved(kitti_depth, frame)
    both = (velo_x > 0) & (png > 0)
    assert both.sum() > 5000
    rel_x = np.median(np.abs(velo_x[both] - png[both]) / png[both])
    rel_z = np.median(np.abs(cam_z[both] - png[both]) / png[both])
    assert rel_x < 0.02  # the standard (velodyne x) ground truth
    assert rel_z < 0.01  # camera z: 0.6-0.9 % as the data README says
    # same pixels, and velodyne x larger than camera z by the ~0.27 m camera-velodyne offset
    assert np.array_equal(velo_x > 0, cam_z > 0)
    offset = float(np.mean(velo_x[velo_x > 0] - cam_z[velo_x > 0]))
    assert 0.25 < offset < 0.31


def test_read_depth_png(kitti_depth, tmp_path):
    path = (kitti_depth / "train" / DRIVE.split("/")[1] / "proj_depth" / "groundtruth" / "image_02"
            / "0000000005.png")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    depth = ground_truth.read_depth_png(path)
    assert depth.shape == (375, 1242) and depth.dtype == np.float32
    r, c = np.argwhere(raw > 0)[0]
    assert depth[r, c] == raw[r, c] / 256.0
    assert np.array_equal(depth == 0, raw == 0)
    cv2.imwrite(str(tmp_path / "u8.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(ground_truth.GroundTruthError, match="uint16"):
        ground_truth.read_depth_png(tmp_path / "u8.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ground_truth.GroundTruthError, match="corrupt"):
        ground_truth.read_depth_png(tmp_path / "junk.png")
    with pytest.raises(ground_truth.MissingGroundTruth):
        ground_truth.read_depth_png(tmp_path / "none.png")
