"""Synthetic drives: exact depth, poses that explain the images, KITTI files read back."""
import cv2
import numpy as np
import pytest
import torch

from diffsql_model.data.calib import load_kitti_calib, stereo_baseline
from diffsql_model.data.synthetic import SyntheticConfig, render_drive
from diffsql_model.data.synthetic_kitti import points_lidar, write_kitti_layout, write_split
from diffsql_model.geometry import warp
from diffsql_model.losses import photometric_error
from diffsql_model.yaml_config import ConfigError

CFG = SyntheticConfig(width=320, height=96, num_frames=4, seed=3)


@pytest.fixture(scope="module")
def drive():
    return render_drive(CFG)


def _t(img):
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().unsqueeze(0) / 255


def _errors(drive, target, src_img, T):
    """Median photometric error of the true-pose warp and of the unwarped source, where visible."""
    depth = torch.from_numpy(drive.depth[target])[None, None]
    tgt = _t(drive.rgb[target])
    K = torch.from_numpy(drive.K).float()[None]
    warped, valid = warp(_t(src_img), depth.clamp(min=1e-3), K, torch.from_numpy(T).float()[None])
    mask = valid & (depth > 0)
    assert mask.float().mean() > 0.5
    err = photometric_error(warped, tgt)[mask].median().item()
    ident = photometric_error(_t(src_img), tgt)[mask].median().item()
    return err, ident


def test_depth_is_exact_on_the_ground_plane(drive):
    K = drive.K
    rows = np.arange(int(K[1, 2]) + 20, CFG.height)
    for i in range(CFG.num_frames):
        expected = CFG.camera_height * K[1, 1] / (rows - K[1, 2])  # h fy / (v - cy)
        np.testing.assert_allclose(drive.depth[i, rows, CFG.width // 2], expected, rtol=1e-6)
    assert drive.depth.dtype == np.float32 and drive.rgb.dtype == np.uint8
    assert drive.rgb.shape == (4, 96, 320, 3) and drive.pose.shape == (4, 4, 4)
    assert (drive.depth == 0).any() and (drive.depth[drive.depth > 0] < CFG.far).all()  # sky is invalid


def test_true_poses_warp_neighbours_onto_the_target(drive):
    for src in (0, 2):
        err, ident = _errors(drive, 1, drive.rgb[src], drive.relative_pose(1, src))
        assert err < 0.05 and err < 0.3 * ident, (src, err, ident)
    # The stereo partner with the known stereo transform.
    err, ident = _errors(drive, 1, drive.rgb_right[1], drive.stereo_T)
    assert err < 0.05 and err < 0.3 * ident, (err, ident)
    # A wrong pose (the other neighbour's) does not explain the view.
    wrong, _ = _errors(drive, 1, drive.rgb[0], drive.relative_pose(1, 2))
    assert wrong > 2 * _errors(drive, 1, drive.rgb[0], drive.relative_pose(1, 0))[0]


def test_motion_is_forward_with_speed_and_heading_changes(drive):
    d = drive.relative_pose(0, 1)  # frame-0 points in frame 1: the camera moved forward
    assert d[2, 3] < -0.5
    steps = np.linalg.norm(np.diff(drive.pose[:, :3, 3], axis=0), axis=1)
    assert steps.std() > 0 and np.allclose(np.diff(drive.stamps), 1 / CFG.fps)
    again = render_drive(SyntheticConfig(width=64, height=32, num_frames=2, seed=3))
    other = render_drive(SyntheticConfig(width=64, height=32, num_frames=2, seed=4))
    assert np.array_equal(again.rgb, render_drive(SyntheticConfig(width=64, height=32, num_frames=2, seed=3)).rgb)
    assert not np.array_equal(again.rgb, other.rgb)
    with pytest.raises(ConfigError):
        SyntheticConfig(width=4)


def test_kitti_layout_round_trip(drive, tmp_path):
    paths = write_kitti_layout(drive, tmp_path, date="2011_01_01", drive_name="2011_01_01_drive_0001_sync")
    calib = load_kitti_calib(paths["date_dir"], 2)
    np.testing.assert_allclose(calib.K, drive.K, rtol=1e-12)
    np.testing.assert_allclose(calib.T_velo_to_cam, drive.T_velo_to_cam, atol=1e-12)
    assert calib.image_size == (CFG.width, CFG.height)
    assert abs(stereo_baseline(paths["date_dir"]) - 0.54) < 1e-9
    frame = 2
    img = cv2.imread(str(paths["drive_dir"] / "image_03" / "data" / f"{frame:010d}.png"))[..., ::-1]
    assert np.array_equal(img, drive.rgb_right[frame])
    png = cv2.imread(str(paths["depth_dir"] / "image_02" / f"{frame:010d}.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16
    gt = png / 256.0
    assert np.array_equal(gt == 0, drive.depth[frame] == 0)
    assert np.abs(gt - drive.depth[frame]).max() <= 1 / 256
    stamps = (paths["drive_dir"] / "velodyne_points" / "timestamps.txt").read_text().splitlines()
    assert len(stamps) == CFG.num_frames and stamps[1] == "2011-01-01 12:00:00.100000000"
    # LiDAR points through the devkit projection land on pixels whose depth they carry.
    scan = np.fromfile(paths["drive_dir"] / "velodyne_points" / "data" / f"{frame:010d}.bin",
                       dtype=np.float32).reshape(-1, 4)
    assert len(scan) > 1000 and (scan[:, 0] > 0).all() and (scan[:, 3] >= 0).all() and (scan[:, 3] <= 1).all()
    uvz = calib.P_velo_to_image @ np.hstack([scan[:, :3], np.ones((len(scan), 1))]).T
    u, v, z = uvz[0] / uvz[2], uvz[1] / uvz[2], uvz[2]
    ui, vi = np.round(u).astype(int), np.round(v).astype(int)
    assert np.abs(u - ui).max() < 1e-3 and np.abs(v - vi).max() < 1e-3
    np.testing.assert_allclose(z, drive.depth[frame][vi, ui], rtol=1e-5)
    assert len(np.unique(vi)) > 20  # many scan rows inside the field of view
    # Ground points lie on the plane z_velo = -(camera height + 0.08).
    ground = points_lidar(drive.depth[frame], drive.K)[:, :3]
    assert np.isclose(ground[:, 2], -(CFG.camera_height + 0.08), atol=1e-4).mean() > 0.2
    split = tmp_path / "splits" / "train_files.txt"
    write_split(split, "2011_01_01", "2011_01_01_drive_0001_sync", [1, 2])
    assert split.read_text() == ("2011_01_01/2011_01_01_drive_0001_sync 1 l\n"
                                 "2011_01_01/2011_01_01_drive_0001_sync 2 l\n")


def test_worlds_draw_varied_drives_and_demo_stays_the_default():
    from diffsql_model.data.synthetic_worlds import DEVELOPMENT, HELD_OUT, WORLDS, drive_config

    assert drive_config("demo", 3, width=320, height=96, num_frames=4) == CFG  # the demo's drives
    assert set(DEVELOPMENT) | set(HELD_OUT) == set(WORLDS) and not set(DEVELOPMENT) & set(HELD_OUT)
    cfgs = [drive_config("varied", s, width=64, height=32, num_frames=3) for s in range(12)]
    assert drive_config("varied", 5, width=64, height=32, num_frames=3) == cfgs[5]  # a function of the seed
    speeds = [c.speed / c.fps for c in cfgs]
    assert 0.5 <= min(speeds) and max(speeds) <= 1.5 and max(speeds) - min(speeds) > 0.4
    assert len({c.sky for c in cfgs}) == 3 and len({c.facades for c in cfgs}) >= 3
    assert len({c.building_height for c in cfgs}) >= 2 and max(c.yaw_amplitude for c in cfgs) > 0.02
    for world in HELD_OUT:  # every world renders and carries exact geometry
        drive = render_drive(drive_config(world, 0, width=64, height=32, num_frames=2))
        assert drive.rgb.std() > 10 and (drive.depth > 0).mean() > 0.5
    with pytest.raises(ConfigError, match="unknown synthetic world"):
        drive_config("mars", 0)


def test_facade_styles_sky_and_heading_wobble_change_the_images():
    base = dict(width=96, height=48, num_frames=3, seed=2)
    plain = render_drive(SyntheticConfig(**base, facades=("noise",)))
    grid = render_drive(SyntheticConfig(**base, facades=("windows",)))
    assert np.array_equal(plain.depth, grid.depth) and not np.array_equal(plain.rgb, grid.rgb)
    flat = render_drive(SyntheticConfig(**base, sky="flat"))
    sky = flat.depth[0] == 0
    assert sky.any() and (flat.rgb[0][sky] == flat.rgb[0][sky][0]).all()  # one colour
    clouds = render_drive(SyntheticConfig(**base, sky="clouds"))
    assert clouds.rgb[0][sky].std(0).max() > 5
    wobble = render_drive(SyntheticConfig(**base, yaw_amplitude=0.05, yaw_period=6.0))
    still = render_drive(SyntheticConfig(**base))
    yaw = [np.arctan2(p[0, 2], p[0, 0]) for p in wobble.pose]
    yaw0 = [np.arctan2(p[0, 2], p[0, 0]) for p in still.pose]
    assert np.abs(np.subtract(yaw, yaw0)).max() > 0.02
    with pytest.raises(ConfigError, match="facades"):
        SyntheticConfig(facades=("brick",))


def test_written_poses_read_back(tmp_path, drive):
    from diffsql_model.data.synthetic_kitti import read_poses

    paths = write_kitti_layout(drive, tmp_path, "2011_01_01", "2011_01_01_drive_0001_sync")
    np.testing.assert_allclose(read_poses(paths["drive_dir"] / "poses.txt"), drive.pose, atol=1e-8)
