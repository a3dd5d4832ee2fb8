"""sensor_msgs Image / CompressedImage -> numpy RGB, without cv_bridge and without ROS.

The functions only read message attributes (encoding, height, width, step, is_bigendian, data,
format), so they decode rclpy messages in the node and rosbags messages in the bag readers alike:
training, evaluation and the node accept the same encodings. Raw images become zero-copy numpy
views of `data` (also when rows are padded); only big-endian data and colour conversions copy.
Every malformed message raises `ImageError` naming what is wrong.
"""
from __future__ import annotations

import cv2
import numpy as np


class ImageError(ValueError):
    """An image message that cannot be decoded (encoding, sizes, data)."""


# encoding -> (numpy dtype, channels), as sensor_msgs/image_encodings.hpp defines them.
ENCODINGS: dict[str, tuple[type, int]] = {
    "rgb8": (np.uint8, 3), "bgr8": (np.uint8, 3), "rgba8": (np.uint8, 4), "bgra8": (np.uint8, 4),
    "rgb16": (np.uint16, 3), "bgr16": (np.uint16, 3), "rgba16": (np.uint16, 4), "bgra16": (np.uint16, 4),
    "mono8": (np.uint8, 1), "mono16": (np.uint16, 1),
    "8UC1": (np.uint8, 1), "8UC3": (np.uint8, 3), "8UC4": (np.uint8, 4),
    "16UC1": (np.uint16, 1), "16UC3": (np.uint16, 3), "32FC1": (np.float32, 1),
    "bayer_rggb8": (np.uint8, 1), "bayer_bggr8": (np.uint8, 1),
    "bayer_gbrg8": (np.uint8, 1), "bayer_grbg8": (np.uint8, 1),
    "bayer_rggb16": (np.uint16, 1), "bayer_bggr16": (np.uint16, 1),
    "bayer_gbrg16": (np.uint16, 1), "bayer_grbg16": (np.uint16, 1),
    # Packed 4:2:2, two bytes a pixel: yuv422 is UYVY, yuv422_yuy2 is YUYV (image_encodings.hpp).
    "yuv422": (np.uint8, 2), "uyvy": (np.uint8, 2), "yuv422_yuy2": (np.uint8, 2), "yuyv": (np.uint8, 2),
}

# Bayer pattern named by its top-left 2x2 block; OpenCV 5 names its codes the same way.
_BAYER = {"rggb": cv2.COLOR_BayerRGGB2RGB, "bggr": cv2.COLOR_BayerBGGR2RGB,
          "gbrg": cv2.COLOR_BayerGBRG2RGB, "grbg": cv2.COLOR_BayerGRBG2RGB}
_YUV = {"yuv422": cv2.COLOR_YUV2RGB_UYVY, "uyvy": cv2.COLOR_YUV2RGB_UYVY,
        "yuv422_yuy2": cv2.COLOR_YUV2RGB_YUY2, "yuyv": cv2.COLOR_YUV2RGB_YUY2}


def image_to_array(msg) -> np.ndarray:
    """HxW or HxWxC array of the encoding's dtype; a view of msg.data unless byte-swapped."""
    enc = msg.encoding
    if enc not in ENCODINGS:
        raise ImageError(f"unsupported encoding {enc!r} (supported: {', '.join(sorted(ENCODINGS))})")
    dtype, ch = ENCODINGS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    item = np.dtype(dtype).itemsize
    row = w * ch * item
    if h <= 0 or w <= 0:
        raise ImageError(f"empty image {w}x{h} ({enc})")
    if step < row:
        raise ImageError(f"step {step} shorter than a row of {w} {enc} pixels ({row} bytes)")
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if buf.size < step * (h - 1) + row:
        raise ImageError(f"data has {buf.size} bytes, {w}x{h} {enc} with step {step} needs {step * h}")
    # Rows may be padded (step > row): take a strided view rather than a copy.
    rows = np.lib.stride_tricks.as_strided(buf, shape=(h, row), strides=(step, 1), writeable=False)
    byteorder = ">" if msg.is_bigendian else "<"
    if item > 1:
        if step % item:
            # Misaligned rows cannot be viewed as a wider dtype: copy them once.
            rows = np.ascontiguousarray(rows)
        arr = rows.view(np.dtype(dtype).newbyteorder(byteorder))
        if msg.is_bigendian:
            arr = arr.astype(dtype)  # native order copy
    else:
        arr = rows
    return arr.reshape(h, w, ch) if ch > 1 else arr.reshape(h, w)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    # Float intensity images are taken to span [0, 1] (cv_bridge's convention for 32FC1 display).
    return (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_to_rgb8(msg) -> np.ndarray:
    """Any supported Image -> HxWx3 uint8 RGB (the view itself for rgb8)."""
    arr = image_to_array(msg)
    enc = msg.encoding
    if enc.startswith("bayer_"):
        return cv2.cvtColor(_to_uint8(arr), _BAYER[enc[6:10]])
    if enc in _YUV:
        return cv2.cvtColor(np.ascontiguousarray(arr), _YUV[enc])
    arr = _to_uint8(arr)
    if enc in ("rgb8", "rgb16", "8UC3", "16UC3"):
        return arr
    if enc in ("bgr8", "bgr16"):
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if enc in ("rgba8", "rgba16", "8UC4"):
        return cv2.cvtColor(arr, cv2.COLOR_RGBA2RGB)
    if enc in ("bgra8", "bgra16"):
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_GRAY2RGB)  # mono / 1-channel


def compressed_to_rgb8(msg) -> np.ndarray:
    """JPEG/PNG CompressedImage -> HxWx3 uint8 RGB (colour or grey, 8 or 16 bit)."""
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if buf.size == 0:
        raise ImageError(f"empty CompressedImage (format {msg.format!r})")
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageError(f"CompressedImage ({msg.format!r}, {buf.size} bytes) is not a decodable JPEG/PNG")
    img = _to_uint8(img)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
