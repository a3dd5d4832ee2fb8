"""Scale recovery: camera_height finds a known scale on rendered and analytic ground planes, and its
log-space Kalman filter drops an implausible fit but follows a genuine step."""
import numpy as np
import pytest

from diffsql_model.data.synthetic import SyntheticConfig, render_drive
from diffsql_model.yaml_config import ConfigError
from diffsql_model.camera import depth_to_points
from diffsql_ros.scale import LogScaleFilter, ScaleConfig, ScaleEstimator, fit_ground_plane

TRUE_SCALE = 3.7  # metres per model unit of the "relative" depth fed to the estimator


def test_camera_height_recovers_the_scale_of_a_rendered_drive():
    """Road, parked cars, buildings and sky from diffsql_model.data.synthetic; relative depth =
    true depth / 3.7 with 2 % multiplicative noise; the camera sits 1.65 m above the road."""
    cfg = SyntheticConfig(width=320, height=96, num_frames=4, seed=3)
    drive = render_drive(cfg)
    rng = np.random.default_rng(0)
    est = ScaleEstimator(ScaleConfig(mode="camera_height", camera_height=cfg.camera_height))
    for depth in drive.depth:
        rel = np.where(depth > 0, depth, np.nan) / TRUE_SCALE * rng.normal(1, 0.02, depth.shape)
        scale = est.update(rel.astype(np.float32), drive.K)
        assert abs(scale / TRUE_SCALE - 1) < 0.05, scale
    fit = est.last_fit
    assert abs(fit.normal[1] + 1) < 0.01 and fit.inlier_ratio > 0.5  # the road is level: normal = -y


def _tilted_plane_depth(K, h, w, height, pitch_deg, roll_deg):
    """Analytic depth of a ground plane `height` below a pitched and rolled camera, with a wall
    at 30 m where rays miss the ground, and a box (car) 7 m ahead in the lower image."""
    p, r = np.radians(pitch_deg), np.radians(roll_deg)
    Rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    Rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    n = Rz @ Rx @ np.array([0.0, -1.0, 0.0])  # ground normal (up) in the camera frame
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    denom = rays @ n
    z = np.where(denom < -1e-6, -height / np.minimum(denom, -1e-6), np.inf)
    z = np.minimum(z, 30.0)
    z[int(0.7 * h):int(0.85 * h), int(0.3 * w):int(0.45 * w)] = 7.0
    return z


def test_camera_height_on_a_tilted_plane_and_smoothing_over_time():
    K = np.array([[721.5377, 0, 609.5593], [0, 721.5377, 172.854], [0, 0, 1.0]])
    rng = np.random.default_rng(1)
    est = ScaleEstimator(ScaleConfig(mode="camera_height", camera_height=1.65))
    for _ in range(5):
        z = _tilted_plane_depth(K, 375, 1242, 1.65, pitch_deg=3.0, roll_deg=2.0)
        scale = est.update((z / TRUE_SCALE * rng.normal(1, 0.01, z.shape)).astype(np.float32), K)
    assert abs(scale / TRUE_SCALE - 1) < 0.05
    # A frame with no ground (a wall filling the view) keeps the smoothed scale.
    assert est.update(np.full((375, 1242), 2.0, np.float32), K) == pytest.approx(scale)
    # Without intrinsics nothing can be fitted: still the previous scale, never a crash.
    assert est.update(z.astype(np.float32), None) == pytest.approx(scale)


def test_ground_fit_rejects_a_vertical_wall():
    rng = np.random.default_rng(0)
    wall = np.stack([rng.uniform(-5, 5, 2000), rng.uniform(-2, 2, 2000), np.full(2000, 10.0)], 1)
    assert fit_ground_plane(wall, ScaleConfig(mode="camera_height"), rng) is None


def test_fixed_stereo_relative_modes_and_config_errors():
    depth = np.ones((8, 8), np.float32)
    assert ScaleEstimator(ScaleConfig()).update(depth, None) == 1.0
    assert ScaleEstimator(ScaleConfig(mode="fixed", factor=2.5)).update(depth, None) == 2.5
    assert ScaleEstimator(ScaleConfig(mode="stereo", stereo_factor=5.4)).update(depth, None) == 5.4
    with pytest.raises(ConfigError):
        ScaleConfig(mode="lidar")
    with pytest.raises(ConfigError):
        ScaleConfig(mode="camera_height", camera_height=0.0)
    with pytest.raises(ConfigError, match="process_noise"):
        ScaleConfig.from_dict({"mode": "camera_height", "process_noise": -0.1})
    with pytest.raises(ConfigError, match="max_gated"):
        ScaleConfig(mode="camera_height", max_gated=0)
    with pytest.raises(ConfigError, match="smoothing"):  # the EMA is gone: a ScaleConfig dict still setting it fails by name
        ScaleConfig.from_dict({"mode": "camera_height", "smoothing": 0.9})


K_KITTI = np.array([[721.5377, 0, 609.5593], [0, 721.5377, 172.854], [0, 0, 1.0]])


def test_ground_fit_gives_the_height_of_a_known_plane_through_depth_to_points():
    """A plane 1.65 m below a camera pitched 3 deg, with a car box in the band and 1 % depth noise:
    the fit finds the height and the pitch, the car is not ground, the residual is the noise's."""
    z = _tilted_plane_depth(K_KITTI, 375, 1242, 1.65, pitch_deg=3.0, roll_deg=0.0)
    z *= np.random.default_rng(2).normal(1, 0.01, z.shape)
    pts, _ = depth_to_points(z, K_KITTI, 4, first_row=int(375 * 0.65))
    fit = fit_ground_plane(pts, ScaleConfig(mode="camera_height"), np.random.default_rng(0))
    assert fit.height == pytest.approx(1.65, rel=0.005)
    # normal of the pitched ground: Rx(3 deg) @ (0, -1, 0) = (0, -cos 3, -sin 3)
    assert fit.normal == pytest.approx([0, -np.cos(np.radians(3)), -np.sin(np.radians(3))], abs=0.005)
    box = (pts[:, 2] > 6.9) & (pts[:, 2] < 7.1) & (np.abs(pts @ fit.normal + fit.height) > 0.1)
    assert box.sum() > 100 and fit.inlier_ratio < 1 - box.mean() + 0.01  # the box is an outlier
    # 1 % depth noise on the ground rows (7-25 m): ~1 % of the height point-to-plane, not the 3 % threshold
    assert 0.003 < fit.residual < 0.015 and fit.log_sigma == pytest.approx(fit.residual / fit.inlier_ratio)


def test_filter_hand_computed_steps():
    cfg = ScaleConfig(mode="camera_height", process_noise=0.01, gate=3.0)
    f = LogScaleFilter()
    assert f.update(0.5, 0.02, cfg) == 0.5 and f.var == pytest.approx(0.0004)  # first fit: taken as is
    # predicted var 0.0004 + 0.0001 = 0.0005, R 0.0004: gain 5/9; innovation 0.03 -> x 0.5 + 0.03 * 5/9
    assert f.update(0.53, 0.02, cfg) == pytest.approx(0.5 + 0.03 * 5 / 9)
    assert f.var == pytest.approx(0.0005 * 4 / 9)
    # gate: 3 * sqrt(0.0005 * 4/9 + 0.0001 + 0.0004) = 0.0745: an innovation of 0.2 is dropped
    x = f.x
    assert f.update(x + 0.2, 0.02, cfg) == x and f.gated
    assert f.update(x + 0.05, 0.02, cfg) != x and not f.gated


def _plane_frames(scale, n, rng):
    """n frames of the analytic pitched plane in model units = metres / scale, 1 % noise."""
    z = _tilted_plane_depth(K_KITTI, 375, 1242, 1.65, pitch_deg=2.0, roll_deg=1.0)
    return [(z / scale * rng.normal(1, 0.01, z.shape)).astype(np.float32) for _ in range(n)]


def test_an_implausible_fit_is_gated_and_a_genuine_step_is_followed():
    rng = np.random.default_rng(3)
    cfg = ScaleConfig(mode="camera_height", camera_height=1.65, max_gated=4)
    est = ScaleEstimator(cfg)
    for depth in _plane_frames(TRUE_SCALE, 6, rng):
        steady = est.update(depth, K_KITTI)
    assert steady == pytest.approx(TRUE_SCALE, rel=0.01)
    # One frame whose ground comes out 25 % too far (a car park ramp, a bad prediction): dropped.
    assert est.update(_plane_frames(TRUE_SCALE / 1.25, 1, rng)[0], K_KITTI) == steady and est.filter.gated
    # The old EMA (weight 0.9) would have moved 2.2 % on it: log(1.25) * 0.1
    assert est.update(_plane_frames(TRUE_SCALE, 1, rng)[0], K_KITTI) == pytest.approx(steady, rel=0.005)
    # The scale really changes by 25 % (another camera mount): held for max_gated - 1 frames, then taken.
    new = [est.update(d, K_KITTI) for d in _plane_frames(TRUE_SCALE / 1.25, 4, rng)]
    assert new[:3] == pytest.approx([new[0]] * 3) and new[0] == pytest.approx(steady, rel=0.005)
    assert new[3] == pytest.approx(TRUE_SCALE / 1.25, rel=0.01)
    # and the filter keeps tracking from there (not gated against the old scale)
    assert est.update(_plane_frames(TRUE_SCALE / 1.25, 1, rng)[0], K_KITTI) == pytest.approx(TRUE_SCALE / 1.25, rel=0.01)
    assert not est.filter.gated
