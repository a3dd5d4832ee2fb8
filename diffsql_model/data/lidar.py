"""LiDAR ground truth from a bag: which scan goes with an image, and its depth in that image.

`LidarDepth` is the one pairing and projection of `diffsql-eval --protocol bag` (through
`bags.BagDataset`) and of the replay evaluator of `diffsql-bag-eval`: the scan nearest in
header stamp within a tolerance, moved into the camera by the LiDAR -> camera extrinsic
(`--extrinsic`, else /tf_static, else identity when both sensors share a frame) and projected
with the image's camera matrix.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from diffsql_model.data.bag_index import BagHandle, TopicIndex
from diffsql_model.data.bag_reader import BagError, decoded, lookup_transform, static_transforms, topics_of
from diffsql_model.data.bag_types import TF_STATIC_TOPIC
from diffsql_model.data.ground_truth import splat_nearest
from diffsql_model.data.pointcloud_msgs import decode_pointcloud

EXTRINSIC_HINT = "pass the LiDAR -> camera transform with --extrinsic (BagDataset: T_lidar_to_cam)"


def lidar_depth_map(points: np.ndarray, T_lidar_to_cam: np.ndarray, K: np.ndarray,
                    size: tuple[int, int], min_depth: float = 1e-3) -> np.ndarray:
    """Project LiDAR points into a camera -> H x W float32 camera-z depth (0 = no point).

    size: (width, height). Pixel = floor(u + 0.5) (ROS 0-based pixel centres); the nearest
    point wins where several land on one pixel. For the KITTI devkit convention used by the
    Eigen benchmark (1-based, velodyne x) use ground_truth.velodyne_depth_map instead.
    """
    width, height = size
    xyz = np.asarray(points, dtype=np.float64)[:, :3]
    cam = xyz @ np.asarray(T_lidar_to_cam)[:3, :3].T + np.asarray(T_lidar_to_cam)[:3, 3]
    cam = cam[cam[:, 2] > min_depth]
    uvw = cam @ np.asarray(K, dtype=np.float64).T
    u = np.floor(uvw[:, 0] / uvw[:, 2] + 0.5)  # ROS: 0-based pixels, centres on integers
    v = np.floor(uvw[:, 1] / uvw[:, 2] + 0.5)
    return splat_nearest(u, v, cam[:, 2], height, width)


def parse_extrinsic(text: str | None) -> np.ndarray | None:
    """'x y z qx qy qz qw' or 12 / 16 row-major numbers -> 4x4 (LiDAR -> camera optical)."""
    if not text:
        return None
    try:
        v = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--extrinsic must be numbers, got {text!r}") from None
    T = np.eye(4)
    if len(v) == 7:
        T[:3, :3] = Rotation.from_quat(v[3:]).as_matrix()
        T[:3, 3] = v[:3]
    elif len(v) in (12, 16):
        T[: len(v) // 4] = np.reshape(v, (-1, 4))
    else:
        raise ValueError(f"--extrinsic needs 7, 12 or 16 numbers, got {len(v)}")
    return T


def bag_extrinsic(reader, path, camera_frame: str, lidar_frame: str) -> tuple[np.ndarray, str]:
    """(LiDAR -> camera 4x4, where it came from) out of an open bag: identity when both sensors
    share a frame, else the chain of /tf_static; a bag without either is a BagError naming
    --extrinsic."""
    cam, lidar = camera_frame.lstrip("/"), lidar_frame.lstrip("/")
    if cam == lidar:
        return np.eye(4), f"identity (camera and LiDAR share frame {cam!r})"
    if TF_STATIC_TOPIC not in topics_of(reader):
        raise BagError(f"{path} has no {TF_STATIC_TOPIC} topic to take the transform from LiDAR frame "
                       f"{lidar!r} to camera frame {cam!r} from: {EXTRINSIC_HINT}")
    try:
        T = lookup_transform(static_transforms(reader, path), cam, lidar)
    except BagError as e:
        raise BagError(f"{path}: {e}: {EXTRINSIC_HINT}") from None
    return T, f"{TF_STATIC_TOPIC} ({lidar_frame} -> {camera_frame})"


class LidarDepth:
    """Depth maps of the scans of one PointCloud2 topic for images of a camera. Only the index
    is kept; a scan is read from the bag when an image needs it (the last two are cached)."""

    depth_definition = "camera z of the nearest-stamp LiDAR scan, projected with camera_info P"

    def __init__(self, scans: TopicIndex, T_lidar_to_cam: np.ndarray | None, tolerance_ns: int,
                 extrinsic_source: str):
        self.scans, self.T_lidar_to_cam = scans, T_lidar_to_cam
        self.tolerance_ns, self.extrinsic_source = tolerance_ns, extrinsic_source
        self._recent: tuple = ()  # ((i, points), ...): replaced whole, so threads never see it half-made

    @classmethod
    def from_bag(cls, bag: BagHandle, topic: str | None, camera_frame: str,
                 T_lidar_to_cam: np.ndarray | None = None, tolerance_s: float = 0.05) -> "LidarDepth":
        """Index `topic` (None: a bag without LiDAR, no image has a scan); T_lidar_to_cam None:
        `bag_extrinsic`, needed only when there are scans."""
        scans = TopicIndex.build(bag, topic) if topic else TopicIndex(bag, None)
        T, source = T_lidar_to_cam, "--extrinsic"
        if T is None and len(scans):
            T, source = bag_extrinsic(bag.reader(), bag.path, camera_frame, scans.frame_id)
        T = None if T is None else np.asarray(T, dtype=np.float64)
        return cls(scans, T, int(tolerance_s * 1e9), source)

    def scan_for(self, stamp: int) -> int | None:
        """Index of the scan nearest to an image stamp within the tolerance, else None."""
        return self.scans.nearest(stamp, self.tolerance_ns)

    def has_scan(self, stamp: int) -> bool:
        return self.scan_for(stamp) is not None

    def points(self, i: int) -> np.ndarray:
        """N x 4 float32 points of scan i in the LiDAR frame."""
        for j, pts in self._recent:
            if j == i:
                return pts
        _, msg = self.scans.read(i)
        pts = decoded(decode_pointcloud, msg, self.scans.bag.path, self.scans.topic)
        self._recent = ((i, pts),) + self._recent[:1]
        return pts

    def depth_map(self, stamp: int, K: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray | None, str]:
        """(H x W metres, 0 = no return; "") for the image of `stamp` with camera matrix K and
        size (width, height), or (None, why not)."""
        i = self.scan_for(stamp)
        if i is None:
            return None, f"no LiDAR scan within {self.tolerance_ns / 1e9:g} s of this image"
        return lidar_depth_map(self.points(i), self.T_lidar_to_cam, K, size), ""

    def close(self) -> None:
        """Close the bag handle the scans are read through."""
        self.scans.bag.close()
