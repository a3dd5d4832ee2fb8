"""diffsql_model.camera: rays, back-projection and projection against numbers worked out by hand,
and against the torch geometry.py they share a pixel convention with."""
import numpy as np
import torch

from diffsql_model import geometry
from diffsql_model.camera import backproject_pixels, depth_to_points, pixel_rays, project_points, ray_grid

# fx = 100, fy = 50, principal point (2, 1): easy to do by hand.
K = np.array([[100.0, 0.0, 2.0], [0.0, 50.0, 1.0], [0.0, 0.0, 1.0]])


def test_pixel_rays_by_hand():
    rx, ry = pixel_rays(K, np.array([2.0, 12.0, 0.0]), np.array([1.0, 6.0, 0.0]))
    np.testing.assert_allclose(rx, [0.0, 0.1, -0.02])  # (u - 2) / 100
    np.testing.assert_allclose(ry, [0.0, 0.1, -0.02])  # (v - 1) / 50


def test_ray_grid_is_row_major_float32_on_the_decimated_pixels():
    rx, ry = ray_grid(K, height=5, width=7, step=3)
    assert rx.shape == ry.shape == (2, 3)  # rows 0, 3; columns 0, 3, 6
    assert rx.dtype == ry.dtype == np.float32 and rx.flags.c_contiguous and ry.flags.c_contiguous
    np.testing.assert_allclose(rx, [[-0.02, 0.01, 0.04]] * 2, rtol=1e-6)
    np.testing.assert_allclose(ry, [[-0.02] * 3, [0.04] * 3], rtol=1e-6)


def test_backproject_pixels_by_hand():
    # pixel (12, 6) at depth 10: x = 0.1 * 10, y = 0.1 * 10; the principal point lies on the axis.
    pts = backproject_pixels(K, np.array([12, 2]), np.array([6, 1]), np.array([10.0, 4.0]))
    np.testing.assert_allclose(pts, [[1.0, 1.0, 10.0], [0.0, 0.0, 4.0]])


def test_depth_to_points_skips_invalid_pixels_and_starts_at_first_row():
    depth = np.arange(1, 21, dtype=np.float32).reshape(4, 5)
    depth[2, 1], depth[2, 3], depth[3, 0] = np.nan, np.inf, 0.0
    pts, pix = depth_to_points(depth, K, stride=1, first_row=2)
    assert pix.tolist() == [[2, 0], [2, 2], [2, 4], [3, 1], [3, 2], [3, 3], [3, 4]]  # row-major
    np.testing.assert_allclose(pts[:, 2], depth[pix[:, 0], pix[:, 1]])
    np.testing.assert_allclose(pts[1], [0.0, 13.0 / 50, 13.0])  # pixel (u=2, v=2), depth 13
    _, pix2 = depth_to_points(depth, K, stride=2)
    assert pix2.tolist() == [[0, 0], [0, 2], [0, 4], [2, 0], [2, 2], [2, 4]]


def test_project_points_inverts_backprojection_and_keeps_float32():
    v, u = np.mgrid[0:4, 0:6]
    z = np.linspace(0.5, 30, u.size)
    pts = backproject_pixels(K, u.ravel(), v.ravel(), z)
    pu, pv = project_points(K, pts)
    np.testing.assert_allclose(pu, u.ravel(), atol=1e-9)
    np.testing.assert_allclose(pv, v.ravel(), atol=1e-9)
    pu32, _ = project_points(K, pts.astype(np.float32))
    assert pu32.dtype == np.float32
    assert project_points(K, np.array([[1.0, -0.5, 10.0]]))[0].tolist() == [12.0]  # 100 * 0.1 + 2


def test_numpy_and_torch_backprojection_agree():
    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 50, (6, 9))
    points = geometry.backproject(torch.from_numpy(depth)[None, None], torch.from_numpy(np.linalg.inv(K))[None])
    pts, pix = depth_to_points(depth, K)
    assert pix.tolist() == np.argwhere(np.ones((6, 9), bool)).tolist()
    np.testing.assert_allclose(pts, points[0, :3].T.numpy(), rtol=1e-12)
