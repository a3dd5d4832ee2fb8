"""sensor_msgs PointCloud2 -> numpy, without ROS: the one decoder of the bag readers, the LiDAR
ground truth and the evaluator of the node's clouds.

Like `image_msgs.py` it only reads message attributes (fields, height, width, point_step,
row_step, is_bigendian, data), so rosbags and rclpy messages decode the same way.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from diffsql_model.data.ros_fields import MessageError

# PointField datatype -> numpy type (sensor_msgs/PointField: INT8 = 1 ... FLOAT64 = 8)
POINTFIELD_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}
INTENSITY_NAMES = ("intensity", "i", "reflectance")


def read_points(msg, names: Sequence[str] | None = None) -> np.ndarray:
    """height x width structured array of the fields `names` (default: all the message declares),
    in the byte order the message declares; a copy, independent of the message's buffer."""
    fields = {f.name: f for f in msg.fields}
    names = list(fields) if names is None else list(names)
    for n in names:
        if n not in fields:
            raise MessageError(f"PointCloud2 lacks field {n!r}; fields: {sorted(fields)}")
        if fields[n].datatype not in POINTFIELD_DTYPES:
            raise MessageError(f"PointCloud2 field {n!r} has unknown datatype {fields[n].datatype}")
    order = ">" if msg.is_bigendian else "<"
    dtype = np.dtype({"names": names, "formats": [order + POINTFIELD_DTYPES[fields[n].datatype] for n in names],
                      "offsets": [fields[n].offset for n in names], "itemsize": int(msg.point_step)})
    h, w, row = int(msg.height), int(msg.width), int(msg.width) * int(msg.point_step)
    row_step = max(int(msg.row_step), row)  # some drivers leave row_step 0 in unorganised clouds
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    need = row_step * (h - 1) + row if h > 0 else 0
    if buf.size < need:
        raise MessageError(f"PointCloud2 holds {buf.size} bytes, {h} x {w} points of {msg.point_step} need {need}")
    rows = np.lib.stride_tricks.as_strided(buf, shape=(h, row), strides=(row_step, 1), writeable=False)
    return np.ascontiguousarray(rows).view(dtype).reshape(h, w)


def decode_pointcloud(msg) -> np.ndarray:
    """PointCloud2 -> N x 4 float32 (x, y, z, intensity, i or reflectance; 0 if absent),
    non-finite points dropped."""
    present = {f.name for f in msg.fields}
    inten = next((n for n in INTENSITY_NAMES if n in present), None)
    names = ["x", "y", "z"] + ([inten] if inten else [])
    rec = read_points(msg, names).reshape(-1)
    out = np.zeros((len(rec), 4), dtype=np.float32)
    for i, n in enumerate(names):
        out[:, i] = rec[n]
    return out[np.isfinite(out[:, :3]).all(axis=1)]
