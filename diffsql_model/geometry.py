"""View-synthesis geometry on torch batches: back-project depth, project into another camera,
warp an image. Its numpy single-frame counterpart (rays, point clouds, projection) is camera.py.

Pixel convention: pixel (u, v) = (column, row) has its centre at integer coordinates, the same
convention K uses (cx ~ (W - 1) / 2 for a centred principal point; KITTI's P_rect follows it).
Normalised grid coordinates are therefore x = 2 u / (W - 1) - 1, and every `grid_sample` here
uses `align_corners=True`, where -1 and +1 are the centres of the first and last pixels.
This is the project's one pixel convention (also ROS camera_info and OpenCV): resizing an image
by s (align_corners=False) maps c -> (c + 0.5) s - 0.5, a horizontal flip cx -> W - 1 - cx
(`data/augment.scale_K`, `diffsql_ros/pointcloud.intrinsics_for_image`, LiDAR maps in
`data/bag_reader`). Exceptions, kept as published: the normalised KITTI K (c = W/2, H/2, built at
the network size) and the devkit's 1-based ground-truth pixels (`data/ground_truth`).

Poses follow docs/interfaces.md: `T` (B x 4 x 4) maps target camera points into the source
camera (X_src = T @ X_tgt), optical frame x right, y down, z forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
try:
    from kornia.geometry import create_meshgrid
except ImportError:  # kornia < 0.8.3: 0.8.2 is the last for Python 3.10 (Humble)
    from kornia.utils import create_meshgrid

_EPS = 1e-7


def _as_4x4(K: torch.Tensor) -> torch.Tensor:
    """B x 3 x 3 or B x 4 x 4 intrinsics -> B x 4 x 4."""
    if K.shape[-2:] == (4, 4):
        return K
    if K.shape[-2:] != (3, 3):
        raise ValueError(f"intrinsics must be B x 3 x 3 or B x 4 x 4, got {tuple(K.shape)}")
    out = torch.eye(4, dtype=K.dtype, device=K.device).repeat(K.shape[0], 1, 1)
    out[:, :3, :3] = K
    return out


def pixel_grid(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """1 x 3 x (H W) homogeneous pixel coordinates (u, v, 1), row-major."""
    uv = create_meshgrid(height, width, normalized_coordinates=False, device=device, dtype=dtype)
    uv = uv.reshape(1, height * width, 2).permute(0, 2, 1)  # 1 x 2 x HW
    return torch.cat([uv, torch.ones_like(uv[:, :1])], dim=1)


def backproject(depth: torch.Tensor, inv_K: torch.Tensor) -> torch.Tensor:
    """depth B x 1 x H x W, inv_K B x 3(4) x 3(4) -> homogeneous camera points B x 4 x (H W)."""
    if depth.dim() != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth must be B x 1 x H x W, got {tuple(depth.shape)}")
    b, _, h, w = depth.shape
    inv_K = _as_4x4(inv_K)[:, :3, :3].to(depth.dtype)
    rays = inv_K @ pixel_grid(h, w, depth.device, depth.dtype)  # B x 3 x HW, z = 1
    points = rays * depth.reshape(b, 1, h * w)
    return torch.cat([points, torch.ones_like(points[:, :1])], dim=1)


def project(points: torch.Tensor, K: torch.Tensor, T: torch.Tensor, height: int, width: int,
            return_depth: bool = False):
    """Homogeneous target points B x 4 x (H W) -> normalised source grid B x H x W x 2.

    `grid` is in [-1, 1] inside the image (align_corners=True convention). With `return_depth`,
    returns `(grid, z)` where z (B x 1 x H x W) is the source-camera depth (<= 0: behind it).
    """
    b = points.shape[0]
    P = (_as_4x4(K).to(points.dtype) @ T.to(points.dtype))[:, :3, :]  # B x 3 x 4
    cam = P @ points  # B x 3 x HW
    z = cam[:, 2:3]
    uv = cam[:, :2] / z.clamp(min=_EPS)
    grid = torch.stack(
        [2.0 * uv[:, 0] / max(width - 1, 1) - 1.0, 2.0 * uv[:, 1] / max(height - 1, 1) - 1.0], dim=-1
    )  # B x HW x 2
    grid = grid.reshape(b, height, width, 2)
    return (grid, z.reshape(b, 1, height, width)) if return_depth else grid


def warp(src_image: torch.Tensor, depth: torch.Tensor, K: torch.Tensor, T: torch.Tensor,
         inv_K: torch.Tensor | None = None):
    """Synthesise the target view from `src_image` (B x C x H x W) with target `depth` and `T`.

    Returns `(warped B x C x H x W, valid B x 1 x H x W bool)`; valid = the point is in front of
    the source camera and lands inside the source image. Outside, border padding repeats the edge.
    `inv_K` (optional) saves inverting K when the caller already has it.
    """
    K4 = _as_4x4(K).to(depth.dtype)
    points = backproject(depth, torch.linalg.inv(K4) if inv_K is None else inv_K)
    return warp_points(src_image, points, K4, T)


def warp_points(src_image: torch.Tensor, points: torch.Tensor, K: torch.Tensor, T: torch.Tensor):
    """`warp` from already back-projected target points (B x 4 x (H W), `backproject`), so several
    sources share one back-projection. Not kornia's warp_frame_depth: that pads with zeros and
    returns no validity mask; the photometric loss wants border padding (Monodepth2)."""
    b, _, h, w = src_image.shape
    grid, z = project(points, K, T, h, w, return_depth=True)
    warped = F.grid_sample(src_image, grid.to(src_image.dtype), mode="bilinear",
                           padding_mode="border", align_corners=True)
    inside = (grid.abs() <= 1.0).all(dim=-1).unsqueeze(1)
    return warped, inside & (z > _EPS)
