"""Reads a camera stream out of a ROS 1 or ROS 2 bag and publishes it into the ROS graph.

Messages keep their recorded headers (stamps, frame ids): the depth node must see what it would
see on the robot. Bags are read with `rosbags.AnyReader` (ROS 1 `.bag`, ROS 2 sqlite3 / mcap
folders); each message is copied field by field into the rclpy class of the same type, which
also maps ROS 1 names (`K`, `P`, `header.seq`) onto ROS 2 ones. The LiDAR ground truth of a
replay is `diffsql_model.data.lidar.LidarDepth`, as for `diffsql-eval --protocol bag`.
"""
from __future__ import annotations

import dataclasses
import importlib
import threading
import time
from typing import Iterator, Optional

import numpy as np

from diffsql_model.data.bag_reader import BagError, decoded, info_topic_for, open_bag, pick_topic, topic_messages
from diffsql_model.data.bag_types import CLOUD_TYPE, IMAGE_TYPES, INFO_TYPE
from diffsql_model.data.pairing import stamp_ns
from diffsql_model.data.ros_fields import camera_matrix, field

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
class ReplayFrame:
    """One image of the bag as the player publishes it."""

    index: int
    log_ns: int  # recording time: drives the replay timing
    stamp_ns: int  # header stamp: pairs the node's depth with this frame and with a LiDAR scan
    image: object  # rosbags message (Image or CompressedImage); None in the index (not loaded)
    image_type: str
    info: object  # rosbags CameraInfo in effect for this frame
    frame_id: str = ""

    def camera(self) -> tuple[np.ndarray, tuple[int, int]]:
        """(3x3 camera matrix, (width, height)) of the image, from its CameraInfo."""
        K = decoded(camera_matrix, self.info, "the bag", f"CameraInfo of image {self.index}")
        return K, (int(self.info.width), int(self.info.height))


def choose_topics(reader, image_topic=None, info_topic=None, lidar_topic=None) -> BagTopics:
    """Resolve the camera / LiDAR topics: as given, else kitti2bag names, else the only candidate."""
    image = pick_topic(reader, image_topic, IMAGE_TYPES, "camera image (--image-topic)", "the bag",
                       PREFERRED["image"])
    info_topic = info_topic_for(reader, image, info_topic, "the bag")
    lidar = pick_topic(reader, lidar_topic, (CLOUD_TYPE,), "PointCloud2 (--lidar-topic)", "the bag",
                       PREFERRED["lidar"], required=False)
    image_type = next(c.msgtype for c in reader.connections if c.topic == image)
    return BagTopics(image, info_topic, lidar, image_type)


def index_camera(reader, topics: BagTopics) -> list[ReplayFrame]:
    """Every image of the topic in recording order, each with the CameraInfo of the same stamp
    (or the latest one recorded before it), images themselves not kept: a long bag stays out of
    memory (`stream_images` reads them again while playing). An image with no CameraInfo yet
    is an error: the node could not project it."""
    infos_by_stamp: dict[int, object] = {}
    latest_info = None
    images = []
    for conn, log_ns, msg in topic_messages(reader, (topics.image, topics.camera_info), reader.paths[0]):
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
        frames.append(ReplayFrame(i, log_ns, st, None, topics.image_type, info, frame_id))
    if not frames:
        raise BagError(f"no messages on {topics.image}")
    return frames


def stream_images(path, topics: BagTopics, frames: list[ReplayFrame]) -> Iterator[ReplayFrame]:
    """The indexed frames again, in recording order, now with their image messages."""
    with open_bag(path) as reader:
        it = topic_messages(reader, [topics.image], path)
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
    for name, ftype in dst.get_fields_and_field_types().items():
        val = field(src, name, None)  # ROS 1 spellings (CameraInfo.K) too; ROS 1-only fields (seq) are left
        if val is None:
            continue
        cur = getattr(dst, name)
        if hasattr(cur, "get_fields_and_field_types"):
            _fill(cur, val)
        elif ftype.startswith("sequence<") and "/" in ftype:
            item_cls = type(cur[0]) if cur else _rclpy_class(ftype[9:-1].replace("/", "/msg/", 1))
            setattr(dst, name, [_fill(item_cls(), v) for v in val])
        elif isinstance(val, np.ndarray):
            if ftype in ("sequence<uint8>",) or ftype.startswith("uint8["):
                setattr(dst, name, val.tobytes())  # bytes: the fast path for big payloads
            elif "[" in ftype and not ftype.startswith("sequence"):
                setattr(dst, name, val.astype(cur.dtype) if hasattr(cur, "dtype") else val.tolist())
            else:
                setattr(dst, name, val.tolist())
        else:
            setattr(dst, name, val)
    return dst


def to_rclpy(msg, msgtype: str):
    """rosbags message object -> rclpy message of the same type (headers and stamps kept)."""
    return _fill(_rclpy_class(msgtype)(), msg)


# ----------------------------------------------------------------------------- publishing

class Player:
    """Publishes ReplayFrames (CameraInfo first, then the image) from a given rclpy node."""

    def __init__(self, node, image_topic: str, info_topic: str, image_type: str, depth: int = 10):
        from rclpy.qos import QoSProfile, ReliabilityPolicy  # ROS 2 only to publish; reading bags needs none

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

    def publish(self, frame: ReplayFrame, info_msg=None, image_msg=None) -> float:
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


def schedule(frames: list[ReplayFrame], rate: Optional[float]) -> Iterator[tuple[ReplayFrame, float]]:
    """(frame, seconds after start at which to publish it): recorded gaps divided by `rate`;
    rate None means as fast as possible (0 for every frame, the caller applies backpressure)."""
    t0 = frames[0].log_ns
    for f in frames:
        yield f, (0.0 if rate is None else (f.log_ns - t0) / 1e9 / rate)
