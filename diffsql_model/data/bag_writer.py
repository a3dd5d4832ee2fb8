"""Write camera (+ stereo partner, LiDAR, static extrinsics) recordings as ROS 1 / ROS 2 bags.

All I/O through `rosbags`: ROS 1 `.bag` (noetic types) or ROS 2 bag folders with the sqlite3
or mcap storage plugin. Also converts a KITTI raw drive into a bag (kitti2bag topic names).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterable, Sequence

import cv2
import numpy as np
from rosbags import rosbag1, rosbag2
from scipy.spatial.transform import Rotation

from diffsql_model.data.bag_types import TF_STATIC_TOPIC, TF_TYPE, get_bag_typestore
from diffsql_model.data.calib import load_kitti_calib, read_calib_file
from diffsql_model.data.ground_truth import read_velodyne_bin
from diffsql_model.data.images import load_rgb
from diffsql_model.data.kitti import read_kitti_timestamps
from diffsql_model.data.ros_fields import spelling

FORMATS = ("ros1", "sqlite3", "mcap")
IMAGE_ENCODINGS = ("rgb8", "bgr8", "mono8", "jpeg", "png")

# kitti2bag's names (the bags most KITTI users have) and a plain ROS 2 naming
KITTI2BAG_TOPICS = {
    "image": "/kitti/camera_color_left/image_raw",
    "info": "/kitti/camera_color_left/camera_info",
    "image_right": "/kitti/camera_color_right/image_raw",
    "info_right": "/kitti/camera_color_right/camera_info",
    "lidar": "/kitti/velo/pointcloud",
    "tf_static": TF_STATIC_TOPIC,
}
ROS2_TOPICS = {
    "image": "/camera/left/image_raw",
    "info": "/camera/left/camera_info",
    "image_right": "/camera/right/image_raw",
    "info_right": "/camera/right/camera_info",
    "lidar": "/lidar/points",
    "tf_static": TF_STATIC_TOPIC,
}
FRAME_IDS = {"camera": "camera_color_left", "camera_right": "camera_color_right", "lidar": "velo_link"}


class BagWriteError(ValueError):
    """Frames that cannot be written as asked (bad shapes, unknown format or encoding)."""


@dataclasses.dataclass
class BagFrame:
    """One camera capture. rgb: H x W x 3 uint8; K: 3x3; P: optional 3x4 (default [K | 0]).

    points: optional N x 4 float32 (x, y, z, intensity) in the LiDAR frame, stamped
    lidar_stamp_ns (default stamp_ns).
    """

    stamp_ns: int
    rgb: np.ndarray
    K: np.ndarray
    P: np.ndarray | None = None
    rgb_right: np.ndarray | None = None
    K_right: np.ndarray | None = None
    P_right: np.ndarray | None = None
    points: np.ndarray | None = None
    lidar_stamp_ns: int | None = None


class _Messages:
    """Builds sensor_msgs / tf2_msgs objects for one typestore (ROS 1 and ROS 2 field names differ)."""

    def __init__(self, store, ros1: bool):
        self.store, self.ros1 = store, ros1
        self.T = store.types

    def header(self, stamp_ns: int, frame_id: str):
        t = self.T["builtin_interfaces/msg/Time"](sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
        kw = {"seq": 0} if self.ros1 else {}
        return self.T["std_msgs/msg/Header"](**kw, stamp=t, frame_id=frame_id)

    def image(self, stamp_ns: int, frame_id: str, rgb: np.ndarray, encoding: str):
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise BagWriteError(f"images must be H x W x 3 uint8 RGB, got {rgb.dtype} {rgb.shape}")
        h, w = rgb.shape[:2]
        if encoding in ("jpeg", "png"):
            ok, buf = cv2.imencode("." + ("jpg" if encoding == "jpeg" else "png"), rgb[:, :, ::-1])
            if not ok:
                raise BagWriteError(f"OpenCV could not encode a {encoding} image")
            return "sensor_msgs/msg/CompressedImage", self.T["sensor_msgs/msg/CompressedImage"](
                header=self.header(stamp_ns, frame_id), format=encoding, data=buf.reshape(-1))
        if encoding == "rgb8":
            data, step = rgb, 3 * w
        elif encoding == "bgr8":
            data, step = rgb[:, :, ::-1], 3 * w
        elif encoding == "mono8":
            data, step = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), w
        else:
            raise BagWriteError(f"unknown image encoding {encoding!r}; use one of {IMAGE_ENCODINGS}")
        return "sensor_msgs/msg/Image", self.T["sensor_msgs/msg/Image"](
            header=self.header(stamp_ns, frame_id), height=h, width=w, encoding=encoding,
            is_bigendian=0, step=step, data=np.ascontiguousarray(data).reshape(-1))

    def camera_info(self, stamp_ns: int, frame_id: str, size, K: np.ndarray, P: np.ndarray | None):
        K = np.asarray(K, dtype=np.float64).reshape(3, 3)
        P = np.hstack([K, np.zeros((3, 1))]) if P is None else np.asarray(P, dtype=np.float64).reshape(3, 4)
        cls = self.T["sensor_msgs/msg/CameraInfo"]
        names = {f.name for f in dataclasses.fields(cls)}
        arrays = {"d": np.zeros(5), "k": K.reshape(-1), "r": np.eye(3).reshape(-1), "p": P.reshape(-1)}
        kw = {spelling(names, n): v for n, v in arrays.items()}
        roi = self.T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
        return "sensor_msgs/msg/CameraInfo", cls(
            header=self.header(stamp_ns, frame_id), height=int(size[1]), width=int(size[0]),
            distortion_model="plumb_bob", binning_x=0, binning_y=0, roi=roi, **kw)

    def pointcloud(self, stamp_ns: int, frame_id: str, points: np.ndarray):
        pts = np.ascontiguousarray(np.asarray(points, dtype=np.float32))
        if pts.ndim != 2 or pts.shape[1] != 4:
            raise BagWriteError(f"LiDAR points must be N x 4 (x, y, z, intensity), got {pts.shape}")
        F = self.T["sensor_msgs/msg/PointField"]
        fields = [F(name=n, offset=4 * i, datatype=7, count=1) for i, n in enumerate(("x", "y", "z", "intensity"))]
        return "sensor_msgs/msg/PointCloud2", self.T["sensor_msgs/msg/PointCloud2"](
            header=self.header(stamp_ns, frame_id), height=1, width=len(pts), fields=fields,
            is_bigendian=False, point_step=16, row_step=16 * len(pts),
            data=pts.view(np.uint8).reshape(-1), is_dense=True)

    def tf_static(self, stamp_ns: int, transforms: Sequence[tuple[str, str, np.ndarray]]):
        """transforms: (parent, child, T_parent_child 4x4: pose of child in parent, X_parent = T X_child)."""
        out = []
        for parent, child, T in transforms:
            T = np.asarray(T, dtype=np.float64)
            q = Rotation.from_matrix(T[:3, :3]).as_quat()  # x, y, z, w
            tr = self.T["geometry_msgs/msg/Transform"](
                translation=self.T["geometry_msgs/msg/Vector3"](x=T[0, 3], y=T[1, 3], z=T[2, 3]),
                rotation=self.T["geometry_msgs/msg/Quaternion"](x=q[0], y=q[1], z=q[2], w=q[3]))
            out.append(self.T["geometry_msgs/msg/TransformStamped"](
                header=self.header(stamp_ns, parent), child_frame_id=child, transform=tr))
        return TF_TYPE, self.T[TF_TYPE](transforms=out)


def write_bag(
    path: str | pathlib.Path,
    frames: Iterable[BagFrame],
    fmt: str = "ros1",
    topics: dict | None = None,
    static_transforms: Sequence[tuple[str, str, np.ndarray]] = (),
    frame_ids: dict | None = None,
    image_encoding: str = "rgb8",
) -> pathlib.Path:
    """Write frames to a new bag. fmt: "ros1" (path should end in .bag), "sqlite3", "mcap" (a folder).

    topics: role -> topic (roles of KITTI2BAG_TOPICS); default kitti2bag names for ROS 1 and
    ROS2_TOPICS for ROS 2. static_transforms go once to /tf_static, stamped at the first frame.
    """
    if fmt not in FORMATS:
        raise BagWriteError(f"unknown bag format {fmt!r}; use one of {FORMATS}")
    if image_encoding not in IMAGE_ENCODINGS:
        raise BagWriteError(f"unknown image encoding {image_encoding!r}; use one of {IMAGE_ENCODINGS}")
    path = pathlib.Path(path)
    if path.exists():
        raise BagWriteError(f"{path} exists already; bags are never overwritten")
    ros1 = fmt == "ros1"
    topics = {**(KITTI2BAG_TOPICS if ros1 else ROS2_TOPICS), **(topics or {})}
    fids = {**FRAME_IDS, **(frame_ids or {})}
    store = get_bag_typestore(ros1)
    msgs = _Messages(store, ros1)
    if ros1:
        writer = rosbag1.Writer(path)
        serialize = store.serialize_ros1
    else:
        plugin = rosbag2.StoragePlugin.SQLITE3 if fmt == "sqlite3" else rosbag2.StoragePlugin.MCAP
        writer = rosbag2.Writer(path, version=9, storage_plugin=plugin)
        serialize = store.serialize_cdr
    connections: dict = {}

    def put(role: str, stamp_ns: int, built) -> None:
        msgtype, msg = built
        if role not in connections:
            kw = {"latching": 1} if (ros1 and role == "tf_static") else {}
            connections[role] = writer.add_connection(topics[role], msgtype, typestore=store, **kw)
        writer.write(connections[role], stamp_ns, serialize(msg, msgtype))

    with writer:
        first = True
        for fr in frames:
            size = (fr.rgb.shape[1], fr.rgb.shape[0])
            if first and static_transforms:
                put("tf_static", fr.stamp_ns, msgs.tf_static(fr.stamp_ns, static_transforms))
            first = False
            put("info", fr.stamp_ns, msgs.camera_info(fr.stamp_ns, fids["camera"], size, fr.K, fr.P))
            put("image", fr.stamp_ns, msgs.image(fr.stamp_ns, fids["camera"], fr.rgb, image_encoding))
            if fr.rgb_right is not None:
                K_r = fr.K if fr.K_right is None else fr.K_right
                put("info_right", fr.stamp_ns, msgs.camera_info(fr.stamp_ns, fids["camera_right"], size, K_r, fr.P_right))
                put("image_right", fr.stamp_ns, msgs.image(fr.stamp_ns, fids["camera_right"], fr.rgb_right, image_encoding))
            if fr.points is not None:
                t = fr.stamp_ns if fr.lidar_stamp_ns is None else fr.lidar_stamp_ns
                put("lidar", t, msgs.pointcloud(t, fids["lidar"], fr.points))
    return path


def kitti_static_transforms(raw_root: str | pathlib.Path, date: str) -> list[tuple[str, str, np.ndarray]]:
    """KITTI extrinsics as a /tf_static tree rooted at imu_link (cameras reached via a 2-link chain)."""
    date_dir = pathlib.Path(raw_root) / date
    imu = read_calib_file(date_dir / "calib_imu_to_velo.txt")
    T_imu_to_velo = np.eye(4)
    T_imu_to_velo[:3, :3] = imu["R"].reshape(3, 3)
    T_imu_to_velo[:3, 3] = imu["T"]
    out = [("imu_link", FRAME_IDS["lidar"], np.linalg.inv(T_imu_to_velo))]
    for cam, name in ((2, FRAME_IDS["camera"]), (3, FRAME_IDS["camera_right"])):
        T_velo_to_cam = load_kitti_calib(date_dir, cam).T_velo_to_cam
        out.append(("imu_link", name, np.linalg.inv(T_velo_to_cam @ T_imu_to_velo)))
    return out


def kitti_drive_to_bag(
    raw_root: str | pathlib.Path,
    date: str,
    drive: str,
    out_path: str | pathlib.Path,
    fmt: str = "ros1",
    frames: Sequence[int] | None = None,
    topics: dict | None = None,
    image_encoding: str = "rgb8",
) -> pathlib.Path:
    """A KITTI raw drive (synced+rectified) -> bag: left/right colour images + camera_info
    (P_rect_02/03), velodyne scans (only frames that have a .bin), /tf_static from the
    calibration; stamps from the drive's timestamps.txt. drive: "0001" or the folder name.
    """
    raw_root = pathlib.Path(raw_root)
    folder = drive if drive.startswith(date) else f"{date}_drive_{drive}_sync"
    drive_dir = raw_root / date / folder
    left_dir, right_dir = drive_dir / "image_02", drive_dir / "image_03"
    if not (left_dir / "data").is_dir():
        raise FileNotFoundError(f"KITTI drive images not found: {left_dir / 'data'}")
    if frames is None:
        frames = sorted(int(p.stem) for p in (left_dir / "data").iterdir() if p.suffix in (".png", ".jpg"))
    cam_stamps = read_kitti_timestamps(left_dir / "timestamps.txt")
    velo_ts = drive_dir / "velodyne_points" / "timestamps.txt"
    velo_stamps = read_kitti_timestamps(velo_ts) if velo_ts.is_file() else []
    left, right = load_kitti_calib(raw_root / date, 2), load_kitti_calib(raw_root / date, 3)

    def gen():
        for f in frames:
            if f >= len(cam_stamps):
                raise FileNotFoundError(f"{left_dir / 'timestamps.txt'} has no line for frame {f}")
            img = next((p for p in (left_dir / "data" / f"{f:010d}.png", left_dir / "data" / f"{f:010d}.jpg")
                        if p.is_file()), None)
            if img is None:
                raise FileNotFoundError(f"KITTI image not found: {left_dir / 'data' / f'{f:010d}.png'}")
            rp = right_dir / "data" / img.name
            bin_path = drive_dir / "velodyne_points" / "data" / f"{f:010d}.bin"
            points = read_velodyne_bin(bin_path) if bin_path.is_file() else None
            yield BagFrame(
                stamp_ns=cam_stamps[f], rgb=load_rgb(img), K=left.K, P=left.P_rect,
                rgb_right=load_rgb(rp) if rp.is_file() else None, K_right=right.K, P_right=right.P_rect,
                points=points,
                lidar_stamp_ns=velo_stamps[f] if (points is not None and f < len(velo_stamps)) else None)

    return write_bag(out_path, gen(), fmt, topics, kitti_static_transforms(raw_root, date),
                     image_encoding=image_encoding)
