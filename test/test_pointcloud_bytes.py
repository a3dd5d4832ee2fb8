"""PointCloudBuilder's buffers (cached, reused, padding zeroed once) give the exact bytes of a
plain numpy back-projection, frame after frame, also when size, rgb or decimation change."""
import sys
import pathlib

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from std_msgs.msg import Header  # noqa: E402

from diffsql_ros.pointcloud import PointCloudBuilder  # noqa: E402

K = np.array([[721.5377, 0.0, 609.5593], [0.0, 721.5377, 172.854], [0.0, 0.0, 1.0]])


def reference_cloud(depth, K, valid, rgb, s):
    """depth_image_proc's layout written out point by point with numpy: the bytes to match."""
    z = depth[::s, ::s].astype(np.float32)
    v, u = np.mgrid[0:depth.shape[0]:s, 0:depth.shape[1]:s]
    rx = ((u - K[0, 2]) / K[0, 0]).astype(np.float32)
    ry = ((v - K[1, 2]) / K[1, 1]).astype(np.float32)
    ok = np.isfinite(z) & (z > 0)
    if valid is not None:
        ok &= valid[::s, ::s]
    z = np.where(ok, z, np.float32(np.nan))
    n = 8 if rgb is not None else 4
    pts = np.zeros(z.shape + (n,), "<f4")
    pts[..., 0], pts[..., 1], pts[..., 2] = rx * z, ry * z, z
    if rgb is not None:
        c = rgb[::s, ::s].astype(np.uint32)
        pts[..., 4] = (c[..., 0] << 16 | c[..., 1] << 8 | c[..., 2]).view(np.float32)
    return pts.tobytes()


@pytest.mark.parametrize("size", [(37, 53), (192, 640)])
def test_reused_buffers_give_reference_bytes(size):
    h, w = size
    rng = np.random.default_rng(1)
    builder = PointCloudBuilder()
    header = Header(frame_id="cam")
    # Same builder through changing frames: rgb on/off, decimation, another size and back.
    for i, (rgb_on, s, hw) in enumerate([(True, 1, (h, w)), (False, 1, (h, w)), (True, 3, (h, w)),
                                         (True, 1, (h + 5, w - 7)), (True, 1, (h, w)), (False, 2, (h, w))]):
        depth = rng.uniform(-1, 90, hw).astype(np.float32)
        depth[rng.random(hw) < 0.1] = np.nan
        depth[0, :3] = [np.inf, -np.inf, 0.0]
        valid = depth < 70 if i % 2 == 0 else None
        rgb = rng.integers(0, 256, hw + (3,), dtype=np.uint8) if rgb_on else None
        cloud = builder.build(depth, K, header, valid, rgb, s)
        assert bytes(cloud.data) == reference_cloud(depth, K, valid, rgb, s), f"frame {i}"
        pts = np.frombuffer(cloud.data, "<f4").reshape(cloud.height, cloud.width, -1)
        assert np.isnan(pts[0, 0, :3]).all() and not np.isnan(pts[..., 3]).any()
