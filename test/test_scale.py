"""Scale recovery: camera_height finds a known scale on rendered and analytic ground planes."""
import numpy as np
import pytest

from diffsql_model.data.synthetic import SyntheticConfig, render_drive
from diffsql_model.yaml_config import ConfigError
from diffsql_ros.scale import ScaleConfig, ScaleEstimator, fit_ground_plane

TRUE_SCALE = 3.7  # metres per model unit of the "relative" depth fed to the estimator


def test_camera_height_recovers_the_scale_of_a_rendered_drive():
    """Road, parked cars, buildings and sky from diffsql_model.data.synthetic; relative depth =
    true depth / 3.7 with 2 % multiplicative noise; the camera sits 1.65 m above the road."""
    cfg = SyntheticConfig(width=320, height=96, num_frames=4, seed=3)
    drive = render_drive(cfg)
    rng = np.random.default_rng(0)
    est = ScaleEstimator(ScaleConfig(mode="camera_height", camera_height=cfg.camera_height, smoothing=0.5))
    for depth in drive.depth:
        rel = np.where(depth > 0, depth, np.nan) / TRUE_SCALE * rng.normal(1, 0.02, depth.shape)
        scale = est.update(rel.astype(np.float32), drive.K)
        assert abs(scale / TRUE_SCALE - 1) < 0.05, scale
    n, d, inliers = est.last_fit
    assert abs(n[1] + 1) < 0.01 and inliers > 0.5  # the road is level: normal = -y


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
    est = ScaleEstimator(ScaleConfig(mode="camera_height", camera_height=1.65, smoothing=0.8))
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
