"""Reads a camera stream out of a ROS 1 or ROS 2 bag and publishes it into the ROS graph.

Messages keep their recorded headers (stamps, frame ids): the depth node must see what it would
see on the robot. Bags are read with `rosbags.AnyReader` (ROS 1 `.bag`, ROS 2 sqlite3 / mcap
folders); each message is copied field by field into the rclpy class of the same type, which
also maps ROS 1 names (`K`, `P`, `header.seq`) onto ROS 2 ones.
"""
from __future__ import annotations

import dataclasses
import importlib
import threading
import time
from typing import Iterator, Optional

import numpy as np

from diffsql_model.data.bag_reader import (  # not bags.py: that imports torch
    CLOUD_TYPE, IMAGE_TYPES, INFO_TYPE, BagError, camera_matrix, decode_pointcloud, info_topic_for,
    iter_messages, lidar_depth_map, lookup_transform, open_bag, pick_topic, read_message_at,
    read_static_transforms,
)
from diffsql_model.data.pairing import nearest_by_stamp, stamp_ns

# Preferred names when a bag holds several candidates: kitti2bag's left colour camera / LiDAR.
PREFERRED = {
    "image": ("/kitti/camera_color_left/image_raw",),
    "lidar": ("/kitti/velo/pointcloud",),
}


@dataclasses.dataclass
class BagTopics:
    image: str
    camera_info: str
    lidar: Optional[str]
    image_type: str


@dataclasses.dataclass
class CameraFrame:
    index: int
    log_ns: int  # recording time: drives the replay timing
    stamp_ns: int  # header stamp: pairs the node's depth with this frame and with a LiDAR scan
    image: object  # rosbags message (Image or CompressedImage); None in the index (not loaded)
    image_type: str
    info: object  # rosbags CameraInfo in effect for this frame
    frame_id: str = ""


def choose_topics(reader, image_topic=None, info_topic=None, lidar_topic=None) -> BagTopics:
    """Resolve the camera / LiDAR topics: as given, else kitti2bag names, else the only candidate."""
    image = pick_topic(reader, image_topic, IMAGE_TYPES, "camera image (--image-topic)", "the bag",
                       PREFERRED["image"])
    info_topic = info_topic_for(reader, image, info_topic, "the bag")
    lidar = pick_topic(reader, lidar_topic, (CLOUD_TYPE,), "PointCloud2 (--lidar-topic)", "the bag",
                       PREFERRED["lidar"], required=False)
    image_type = next(c.msgtype for c in reader.connections if c.topic == image)
    return BagTopics(image, info_topic, lidar, image_type)


def index_camera(reader, topics: BagTopics) -> list[CameraFrame]:
    """Every image of the topic in recording order, each with the CameraInfo of the same stamp
    (or the latest one recorded before it), images themselves not kept: a long bag stays out of
    memory (`stream_images` reads them again while playing). An image with no CameraInfo yet
    is an error: the node could not project it."""
    conns = [c for c in reader.connections if c.topic in (topics.image, topics.camera_info)]
    infos_by_stamp: dict[int, object] = {}
    latest_info = None
    images = []
    for conn, log_ns, msg in iter_messages(reader, conns, reader.paths[0]):
        if conn.topic == topics.camera_info:
            latest_info = msg
            infos_by_stamp[stamp_ns(msg.header)] = msg
        else:
            images.append((log_ns, stamp_ns(msg.header), msg.header.frame_id, latest_info))
    frames = []
    for i, (log_ns, st, frame_id, latest) in enumerate(images):
        info = infos_by_stamp.get(st, latest)
        if info is None:
            raise BagError(f"image {i} on {topics.image} (stamp {st}) has no CameraInfo on {topics.camera_info}")
        frames.append(CameraFrame(i, log_ns, st, None, topics.image_type, info, frame_id))
    if not frames:
        raise BagError(f"no messages on {topics.image}")
    return frames


def stream_images(path, topics: BagTopics, frames: list[CameraFrame]) -> Iterator[CameraFrame]:
    """The indexed frames again, in recording order, now with their image messages."""
    with open_bag(path) as reader:
        conns = [c for c in reader.connections if c.topic == topics.image]
        it = iter_messages(reader, conns, path)
        for frame in frames:
            _, _, msg = next(it, (None, None, None))
            if msg is None:
                raise BagError(f"{path}: image {frame.index} vanished on re-read")
            if stamp_ns(msg.header) != frame.stamp_ns:
                raise BagError(f"{path}: image {frame.index} changed between reads")
            yield dataclasses.replace(frame, image=msg)


# ----------------------------------------------------------------------------- rosbags -> rclpy

def _rclpy_class(msgtype: str):
    pkg, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), name)


def _fill(dst, src):
    for field, ftype in dst.get_fields_and_field_types().items():
        # ROS 1 spells some fields in capitals (CameraInfo.K); ROS 1-only fields (seq) are skipped.
        val = getattr(src, field, None)
        if val is None:
            val = getattr(src, field.upper(), None)
        if val is None:
            continue
        cur = getattr(dst, field)
        if hasattr(cur, "get_fields_and_field_types"):
            _fill(cur, val)
        elif ftype.startswith("sequence<") and "/" in ftype:
            item_cls = type(cur[0]) if cur else _rclpy_class(ftype[9:-1].replace("/", "/msg/", 1))
            setattr(dst, field, [_fill(item_cls(), v) for v in val])
        elif isinstance(val, np.ndarray):
            if ftype in ("sequence<uint8>",) or ftype.startswith("uint8["):
                setattr(dst, field, val.tobytes())  # bytes: the fast path for big payloads
            elif "[" in ftype and not ftype.startswith("sequence"):
                setattr(dst, field, val.astype(cur.dtype) if hasattr(cur, "dtype") else val.tolist())
            else:
                setattr(dst, field, val.tolist())
        else:
            setattr(dst, field, val)
    return dst


def to_rclpy(msg, msgtype: str):
    """rosbags message object -> rclpy message of the same type (headers and stamps kept)."""
    return _fill(_rclpy_class(msgtype)(), msg)


# ----------------------------------------------------------------------------- publishing

class Player:
    """Publishes CameraFrames (CameraInfo first, then the image) from a given rclpy node."""

    def __init__(self, node, image_topic: str, info_topic: str, image_type: str, depth: int = 10):
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        # Reliable: a depth node with either reliable or best-effort subscriptions accepts it.
        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)
        self.node = node
        self.image_type = image_type
        self.info_pub = node.create_publisher(_rclpy_class(INFO_TYPE), info_topic, qos)
        self.image_pub = node.create_publisher(_rclpy_class(image_type), image_topic, qos)
        self.publish_times: dict[int, float] = {}  # stamp_ns -> time.monotonic() at publish
        self._lock = threading.Lock()

    def wait_for_subscribers(self, timeout_s: float, alive=lambda: True) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive():
            if self.image_pub.get_subscription_count() > 0 and self.info_pub.get_subscription_count() > 0:
                return True
            time.sleep(0.05)
        return False

    def publish(self, frame: CameraFrame, info_msg=None, image_msg=None) -> float:
        """Publish one frame; returns the monotonic publish time (what latency is measured from)."""
        info_msg = info_msg or to_rclpy(frame.info, INFO_TYPE)
        image_msg = image_msg or to_rclpy(frame.image, frame.image_type)
        self.info_pub.publish(info_msg)
        t = time.monotonic()
        with self._lock:
            self.publish_times[frame.stamp_ns] = t
        self.image_pub.publish(image_msg)
        return t

    def publish_time(self, stamp: int) -> Optional[float]:
        with self._lock:
            return self.publish_times.get(stamp)


def schedule(frames: list[CameraFrame], rate: Optional[float]) -> Iterator[tuple[CameraFrame, float]]:
    """(frame, seconds after start at which to publish it): recorded gaps divided by `rate`;
    rate None means as fast as possible (0 for every frame, the caller applies backpressure)."""
    t0 = frames[0].log_ns
    for f in frames:
        yield f, (0.0 if rate is None else (f.log_ns - t0) / 1e9 / rate)


# ----------------------------------------------------------------------------- LiDAR ground truth

def parse_extrinsic(text: Optional[str]) -> Optional[np.ndarray]:
    """'x y z qx qy qz qw' or 12 / 16 row-major numbers -> 4x4 (LiDAR -> camera optical)."""
    if not text:
        return None
    from scipy.spatial.transform import Rotation

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


class GroundTruth:
    """The bag's LiDAR scans, turned into a depth map for any image stamp with the bag readers'
    `lidar_depth_map` (the ground truth of `diffsql-eval --protocol bag`). Only stamps are kept;
    a scan is read from the bag when an image needs it (bags of hours fit in memory)."""

    depth_definition = "camera z of the nearest-stamp LiDAR scan, projected with camera_info P"

    def __init__(self, path, topic, stamps, log_times, T_lidar_to_cam, infos, tolerance_ns, extrinsic_source):
        self.path, self.topic = path, topic
        self.stamps, self.log_times = list(stamps), list(log_times)  # ascending stamps
        self.T = T_lidar_to_cam
        self.infos = infos  # image stamp -> (K 3x3, (width, height))
        self.tolerance_ns = tolerance_ns
        self.extrinsic_source = extrinsic_source
        self._reader_ctx = self._reader = None
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_bag(cls, path, topics: BagTopics, frames, extrinsic=None, tolerance_s: float = 0.05):
        infos = {f.stamp_ns: (camera_matrix(f.info), (int(f.info.width), int(f.info.height)))
                 for f in frames}
        stamps, log_times, lidar_frame = [], [], None
        if topics.lidar:
            with open_bag(path) as reader:
                conns = [c for c in reader.connections if c.topic == topics.lidar]
                for _, t, msg in iter_messages(reader, conns, path):
                    stamps.append(stamp_ns(msg.header))
                    log_times.append(t)
                    lidar_frame = msg.header.frame_id
        order = np.argsort(stamps, kind="stable")
        stamps, log_times = [stamps[i] for i in order], [log_times[i] for i in order]
        T, source = extrinsic, "--extrinsic"
        if T is None and stamps:
            cam_frame = frames[0].frame_id
            try:
                T = lookup_transform(read_static_transforms(path), cam_frame, lidar_frame)
            except BagError as e:
                raise BagError(f"{e}: pass the LiDAR -> camera transform with --extrinsic") from None
            source = f"/tf_static ({lidar_frame} -> {cam_frame})"
        return cls(path, topics.lidar, stamps, log_times, T, infos, int(tolerance_s * 1e9), source)

    def _nearest(self, stamp: int) -> Optional[int]:
        return nearest_by_stamp(self.stamps, stamp, self.tolerance_ns)

    def has_scan(self, stamp: int) -> bool:
        return self._nearest(stamp) is not None

    def _scan(self, i: int) -> np.ndarray:
        """Points of scan i, read by seeking to its recording time (the last two are cached)."""
        if i in self._cache:
            return self._cache[i]
        if self._reader is None:
            self._reader_ctx = open_bag(self.path)
            self._reader = self._reader_ctx.__enter__()
        _, msg = read_message_at(self._reader, self.topic, self.log_times[i], self.stamps[i], self.path)
        if len(self._cache) >= 2:
            self._cache.pop(next(iter(self._cache)))
        self._cache[i] = decode_pointcloud(msg)
        return self._cache[i]

    def depth_map(self, stamp: int):
        """(H x W metres, 0 = no return) for the image of `stamp`, or (None, why not)."""
        i = self._nearest(stamp)
        if i is None:
            return None, f"no LiDAR scan within {self.tolerance_ns / 1e9:g} s of this image"
        K, size = self.infos[stamp]
        with self._lock:
            points = self._scan(i)
        return lidar_depth_map(points, self.T, K, size), ""

    def close(self) -> None:
        if self._reader_ctx is not None:
            self._reader_ctx.__exit__(None, None, None)
            self._reader_ctx = self._reader = None
