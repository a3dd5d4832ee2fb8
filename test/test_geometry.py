"""View-synthesis geometry against hand-computed projections."""
import math

import torch

from diffsql_model.geometry import backproject, pixel_grid, project, warp


def _K(fx=100.0, fy=100.0, cx=50.0, cy=40.0):
    K = torch.eye(4)
    K[0, 0], K[1, 1], K[0, 2], K[1, 2] = fx, fy, cx, cy
    return K.unsqueeze(0)


def test_backproject_then_project_identity_returns_pixel_grid():
    h, w = 81, 101
    K = _K()
    depth = torch.rand(1, 1, h, w) * 50 + 1
    points = backproject(depth, torch.linalg.inv(K))
    assert points.shape == (1, 4, h * w)
    assert torch.allclose(points[:, 2], depth.reshape(1, -1))  # camera z is the depth
    grid = project(points, K, torch.eye(4).unsqueeze(0), h, w)
    assert grid.shape == (1, h, w, 2)
    u = (grid[..., 0] + 1) / 2 * (w - 1)
    v = (grid[..., 1] + 1) / 2 * (h - 1)
    pix = pixel_grid(h, w)[0, :2].reshape(2, h, w)
    assert torch.allclose(u[0], pix[0], atol=1e-3) and torch.allclose(v[0], pix[1], atol=1e-3)


def test_point_at_known_depth_projects_to_hand_computed_pixel():
    h, w = 81, 101
    K = _K()
    depth = torch.full((1, 1, h, w), 10.0)
    depth[0, 0, 50, 70] = 4.0  # pixel (u=70, v=50) at z=4 -> camera point (0.8, 0.4, 4)
    points = backproject(depth, torch.linalg.inv(K)).reshape(1, 4, h, w)
    assert torch.allclose(points[0, :, 50, 70], torch.tensor([0.8, 0.4, 4.0, 1.0]), atol=1e-5)
    T = torch.eye(4).unsqueeze(0)
    T[0, :3, 3] = torch.tensor([0.5, -0.2, 1.0])  # source point (1.3, 0.2, 5)
    grid, z = project(points.reshape(1, 4, -1), K, T, h, w, return_depth=True)
    # u = 100 * 1.3 / 5 + 50 = 76, v = 100 * 0.2 / 5 + 40 = 44 -> normalised 2u/(W-1) - 1
    assert torch.allclose(grid[0, 50, 70], torch.tensor([2 * 76 / 100 - 1, 2 * 44 / 80 - 1]), atol=1e-5)
    assert math.isclose(z[0, 0, 50, 70].item(), 5.0, rel_tol=1e-6)


def test_warp_identity_and_integer_shift():
    h, w = 20, 30
    K = _K(50.0, 50.0, 14.5, 9.5)
    img = torch.rand(2, 3, h, w)
    depth = torch.full((2, 1, h, w), 5.0)
    out, valid = warp(img, depth, K.expand(2, 4, 4), torch.eye(4).expand(2, 4, 4))
    assert torch.allclose(out, img, atol=1e-5) and valid.all()
    # Source camera 0.2 m to the left: fx * tx / z = 50 * 0.2 / 5 = 2 pixels to the right.
    T = torch.eye(4).unsqueeze(0)
    T[0, 0, 3] = 0.2
    out, valid = warp(img[:1], depth[:1], K[:, :3, :3], T)  # 3x3 intrinsics accepted too
    assert torch.allclose(out[..., :-2], img[:1, :, :, 2:], atol=1e-5)
    assert valid[..., :-2].all() and not valid[..., -2:].any()


def test_warp_points_behind_source_are_invalid():
    h, w = 8, 8
    T = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0])).unsqueeze(0)
    T[0, 2, 3] = -10.0  # source camera 10 m ahead of every point at 5 m
    _, valid = warp(torch.rand(1, 3, h, w), torch.full((1, 1, h, w), 5.0), _K(8, 8, 3.5, 3.5), T)
    assert not valid.any()
