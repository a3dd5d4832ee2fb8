"""Read camera streams, LiDAR scans and static extrinsics from ROS 1 / ROS 2 bags (rosbags).

ROS 1 `.bag` files and ROS 2 bag folders (sqlite3 or mcap) go through
`rosbags.highlevel.AnyReader`; message fields are read under both the ROS 1 (`K`, `P`) and
ROS 2 (`k`, `p`) spellings (`ros_fields`). Every failure is a `BagError` naming the bag and the
cause.
"""
from __future__ import annotations

import collections
import contextlib
import pathlib
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
from rosbags.highlevel import AnyReader
from scipy.spatial.transform import Rotation

from diffsql_model.data.bag_types import CLOUD_TYPE, IMAGE_TYPES, INFO_TYPE, TF_STATIC_TOPIC, get_bag_typestore
from diffsql_model.data.image_msgs import ImageError, compressed_to_rgb8, image_to_rgb8
from diffsql_model.data.pairing import nearest_by_stamp, stamp_ns
from diffsql_model.data.pointcloud_msgs import decode_pointcloud
from diffsql_model.data.ros_fields import MessageError, camera_matrix


class BagError(RuntimeError):
    """A bag that cannot be read as asked: missing, truncated, corrupt, ambiguous topics, bad encodings."""


class CameraFrame(NamedTuple):
    stamp_ns: int  # header stamp
    rgb: np.ndarray  # H x W x 3 uint8
    K: np.ndarray  # 3 x 3 float64 (from camera_info P, left 3x3)
    frame_id: str


class LidarScan(NamedTuple):
    stamp_ns: int
    points: np.ndarray  # N x 4 float32: x, y, z, intensity (0 where the cloud has none)
    frame_id: str


def _bag_path(path) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise BagError(f"bag not found: {path}")
    if path.is_file() and path.suffix in (".db3", ".mcap") and (path.parent / "metadata.yaml").is_file():
        return path.parent  # a ROS 2 storage file given instead of its bag folder
    return path


@contextlib.contextmanager
def open_bag(path):
    """`with open_bag(p) as reader:` an opened AnyReader; clear BagError when the bag is unreadable."""
    path = _bag_path(path)
    ros1 = path.suffix == ".bag"
    try:
        reader = AnyReader([path], default_typestore=get_bag_typestore(ros1))
        reader.open()
    except Exception as err:  # rosbags raises several reader error types, all meaning "unreadable"
        hint = ("a ROS 1 bag file must end in .bag" if path.is_file() and not ros1 else
                "truncated or corrupt? rosbags needs an intact index/footer; `rosbag reindex` (ROS 1) "
                "or `ros2 bag reindex` (sqlite3) may recover the frames before the damage")
        raise BagError(f"cannot open bag {path}: {type(err).__name__}: {err} ({hint})") from err
    try:
        yield reader
    finally:
        reader.close()


def iter_messages(reader, connections, path, start: int | None = None,
                  stop: int | None = None) -> Iterator[tuple[object, int, object]]:
    """(connection, log time, deserialized message) of `connections`, log times in [start, stop)
    when given; no connection, no message; damage mid-bag -> BagError after the good ones."""
    if not connections:
        return  # rosbags reads an empty connection list as "no filter": every message of the bag
    it = reader.messages(connections=connections, start=start, stop=stop)
    while True:
        try:
            conn, t, raw = next(it)
            msg = reader.deserialize(raw, conn.msgtype)
        except StopIteration:
            return
        except Exception as err:
            raise BagError(f"bag {path} is damaged after the messages read so far: "
                           f"{type(err).__name__}: {err}") from err
        yield conn, t, msg


def topic_messages(reader, topics: Iterable[str], path, start: int | None = None,
                   stop: int | None = None) -> Iterator[tuple[object, int, object]]:
    """`iter_messages` of the named topics, in recording order (none when the bag has none of them)."""
    wanted = set(topics)
    yield from iter_messages(reader, [c for c in reader.connections if c.topic in wanted], path, start, stop)


def decoded(decode: Callable, msg, path, topic: str):
    """decode(msg), a message it cannot decode as a BagError naming the bag and the topic."""
    try:
        return decode(msg)
    except MessageError as e:
        raise BagError(f"{path}: {topic}: {e}") from None


def read_message_at(reader, topic: str, log_ns: int, stamp: int, path) -> tuple[object, object]:
    """(connection, message) of `topic` recorded at `log_ns` with header stamp `stamp`: a seek
    by recording time, so one message of a long bag is read again without a scan."""
    for conn, _, msg in topic_messages(reader, [topic], path, start=log_ns, stop=log_ns + 1):
        if stamp_ns(msg.header) == stamp:
            return conn, msg
    raise BagError(f"{path}: the message of {topic} with stamp {stamp} vanished on re-read")


def topics_of(reader) -> dict[str, str]:
    return {c.topic: c.msgtype for c in reader.connections}


def pick_topic(reader, wanted: str | None, msgtypes, what: str, path, preferred=(),
               required: bool = True) -> str | None:
    """The topic named `wanted` (checked), else the first of `preferred` present, else the single
    topic of one of `msgtypes`; none found: BagError, or None when not `required`."""
    topics = topics_of(reader)
    if wanted is not None:
        if wanted not in topics:
            raise BagError(f"{path}: no topic {wanted!r}; topics: {sorted(topics)}")
        if topics[wanted] not in msgtypes:
            raise BagError(f"{path}: topic {wanted!r} is {topics[wanted]}, expected {' or '.join(msgtypes)}")
        return wanted
    found = sorted(t for t, ty in topics.items() if ty in msgtypes)
    for name in preferred:
        if name in found:
            return name
    if len(found) == 1:
        return found[0]
    if not found:
        if not required:
            return None
        raise BagError(f"{path}: no {what} topic ({' / '.join(msgtypes)}); topics: {sorted(topics)}")
    raise BagError(f"{path}: several {what} topics, choose one: {found}")


def info_topic_for(reader, image_topic: str, wanted: str | None, path) -> str:
    """camera_info beside the image topic (`<ns>/camera_info`), else the single CameraInfo topic."""
    if wanted is not None:
        return pick_topic(reader, wanted, (INFO_TYPE,), "camera_info", path)
    ns = image_topic[: -len("/compressed")] if image_topic.endswith("/compressed") else image_topic
    sibling = ns.rsplit("/", 1)[0] + "/camera_info"
    if topics_of(reader).get(sibling) == INFO_TYPE:
        return sibling
    return pick_topic(reader, None, (INFO_TYPE,), "camera_info", path)


def decode_image(msg, msgtype: str) -> np.ndarray:
    """sensor_msgs Image (every encoding the depth node accepts) or CompressedImage -> H x W x 3
    uint8 RGB, writable and contiguous (the decoders return read-only views of the bag's buffer)."""
    try:
        rgb = compressed_to_rgb8(msg) if msgtype.endswith("CompressedImage") else image_to_rgb8(msg)
    except ImageError as e:
        raise BagError(str(e)) from None
    return rgb if rgb.flags.writeable and rgb.flags.c_contiguous else rgb.copy()


def read_camera_stream(path, image_topic: str | None = None, info_topic: str | None = None,
                       K: np.ndarray | None = None) -> Iterator[CameraFrame]:
    """Yield CameraFrame for every image of one camera, K from the camera_info nearest in stamp
    (or `K` given explicitly when the bag has no camera_info)."""
    with open_bag(path) as reader:
        topic = pick_topic(reader, image_topic, IMAGE_TYPES, "camera image", path)
        info = None if K is not None else info_topic_for(reader, topic, info_topic, path)
        info_stamps, info_K = [], []
        if info is not None:
            pairs = sorted(((stamp_ns(m.header), decoded(camera_matrix, m, path, info))
                            for _, _, m in topic_messages(reader, [info], path)), key=lambda p: p[0])
            if not pairs:
                raise BagError(f"{path}: camera_info topic {info} holds no message")
            info_stamps, info_K = [p[0] for p in pairs], [p[1] for p in pairs]
        for conn, _, msg in topic_messages(reader, [topic], path):
            t = stamp_ns(msg.header)
            k = np.asarray(K, dtype=np.float64) if K is not None else info_K[nearest_by_stamp(info_stamps, t)]
            yield CameraFrame(t, decode_image(msg, conn.msgtype), k, msg.header.frame_id)


def read_lidar(path, lidar_topic: str | None = None) -> Iterator[LidarScan]:
    """Yield every PointCloud2 scan of one topic as N x 4 float32 in its own frame."""
    with open_bag(path) as reader:
        topic = pick_topic(reader, lidar_topic, (CLOUD_TYPE,), "PointCloud2", path)
        for _, _, msg in topic_messages(reader, [topic], path):
            yield LidarScan(stamp_ns(msg.header), decoded(decode_pointcloud, msg, path, topic), msg.header.frame_id)


def static_transforms(reader, path, topic: str = TF_STATIC_TOPIC) -> list[tuple[str, str, np.ndarray]]:
    """(parent, child, T_parent_child 4x4) of every transform on `topic` of an open bag (empty
    when the bag has no such topic)."""
    out = []
    for _, _, msg in topic_messages(reader, [topic], path):
        for tf in msg.transforms:
            tr, q = tf.transform.translation, tf.transform.rotation
            T = np.eye(4)
            T[:3, :3] = Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix()
            T[:3, 3] = (tr.x, tr.y, tr.z)
            out.append((tf.header.frame_id.lstrip("/"), tf.child_frame_id.lstrip("/"), T))
    return out


def read_static_transforms(path, topic: str = TF_STATIC_TOPIC) -> list[tuple[str, str, np.ndarray]]:
    """`static_transforms` of the bag at `path`."""
    with open_bag(path) as reader:
        return static_transforms(reader, path, topic)


def lookup_transform(transforms, target: str, source: str) -> np.ndarray:
    """4x4 mapping points of frame `source` into frame `target`, composing the tree's chain."""
    target, source = target.lstrip("/"), source.lstrip("/")
    graph = collections.defaultdict(list)
    for parent, child, T in transforms:  # X_parent = T X_child
        graph[child].append((parent, T))
        graph[parent].append((child, np.linalg.inv(T)))
    # breadth-first from source; each hop maps points of the current frame into the next
    seen = {source: np.eye(4)}
    queue = collections.deque([source])
    while queue:
        frame = queue.popleft()
        if frame == target:
            return seen[frame]
        for nxt, T in graph[frame]:
            if nxt not in seen:
                seen[nxt] = T @ seen[frame]
                queue.append(nxt)
    raise BagError(f"no static transform chain from {source!r} to {target!r}; "
                   f"frames on /tf_static: {sorted(graph)}")
