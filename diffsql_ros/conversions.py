"""sensor_msgs Image / CompressedImage <-> numpy without cv_bridge.

Decoding (`image_to_array`, `image_to_rgb8`, `compressed_to_rgb8`, `ImageError`) lives in
diffsql_model/data/image_msgs.py, shared with the bag readers; the colour map of `depth/colored`
is diffsql_model/colormaps.py. This module adds what needs ROS: building Image messages.
"""
from __future__ import annotations

import array

import numpy as np
from sensor_msgs.msg import Image

from diffsql_model.data.image_msgs import ENCODINGS, ImageError


def array_to_image(arr: np.ndarray, encoding: str, header=None) -> Image:
    """Numpy array -> Image (little-endian, packed rows, `bytes` data)."""
    if encoding not in ENCODINGS:
        raise ImageError(f"unsupported encoding {encoding!r}")
    dtype, ch = ENCODINGS[encoding]
    arr = np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<"))
    if arr.ndim != (2 if ch == 1 else 3) or (ch > 1 and arr.shape[2] != ch):
        raise ImageError(f"array of shape {arr.shape} does not fit encoding {encoding}")
    msg = Image(check_fields=True)  # keeps the array('B') below as is (default setter copies it)
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(arr.shape[0]), int(arr.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(arr.strides[0])
    msg.data = to_uint8_array(arr)
    return msg


def to_uint8_array(arr: np.ndarray) -> array.array:
    """Contiguous array -> array.array('B'): the type rclpy stores uint8[] fields in, so a
    message built with check_fields=True keeps it as is (one memcpy; bytes are copied twice)."""
    out = array.array("B")
    out.frombytes(memoryview(np.ascontiguousarray(arr)).cast("B"))
    return out
