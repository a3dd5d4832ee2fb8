"""Depth image -> PointCloud2 laid out as depth_image_proc does, and camera_info intrinsics.

Layout: x, y, z float32 at offsets 0, 4, 8 (point_step 16), or + rgb float32 at 16 (point_step
32, bytes b, g, r, 0 as PCL packs it); little-endian, is_dense False, organised height x width
(a decimated grid keeps every n-th row and column). Points with invalid depth are NaN.
"""
from __future__ import annotations

import array

import cv2
import numpy as np
from sensor_msgs.msg import CameraInfo, PointCloud2, PointField

from diffsql_model.camera import ray_grid
from diffsql_model.data.augment import scale_K
# Not used here: evaluator_node, test_conversions and test_depth_node still import it from this module.
from diffsql_model.data.ros_fields import MessageError, camera_matrix


class CameraInfoError(ValueError):
    """camera_info that does not describe the image it is paired with."""


def calibrated_K(info: CameraInfo) -> np.ndarray:
    """3x3 intrinsics of the rectified image: P's left 3x3, or K where P is unset (all zero).
    As image_geometry / depth_image_proc, and the same function the bag ground truth uses."""
    try:
        return camera_matrix(info)
    except MessageError as e:
        raise CameraInfoError(str(e)) from None


def intrinsics_for_image(info: CameraInfo, width: int, height: int) -> np.ndarray:
    """3x3 K (`calibrated_K`) in pixels of a width x height image, honouring binning, ROI and a
    uniform resize of the calibrated image (e.g. an image_proc resize upstream that kept the old
    camera_info)."""
    K = calibrated_K(info)
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise CameraInfoError(f"camera_info has no intrinsics (fx={K[0, 0]}, fy={K[1, 1]})")
    bx, by = max(int(info.binning_x), 1), max(int(info.binning_y), 1)
    roi = info.roi
    cal_w, cal_h = int(info.width), int(info.height)
    if roi.width > 0 and roi.height > 0:
        # REP 104: the ROI is in full-resolution pixels, before binning.
        K[0, 2] -= roi.x_offset
        K[1, 2] -= roi.y_offset
        cal_w, cal_h = int(roi.width), int(roi.height)
    K[0] /= bx
    K[1] /= by
    cal_w, cal_h = cal_w // bx, cal_h // by
    if cal_w <= 0 or cal_h <= 0:
        raise CameraInfoError(f"camera_info size {info.width}x{info.height} is empty")
    if (cal_w, cal_h) != (width, height):
        sx, sy = width / cal_w, height / cal_h
        if abs(sx / sy - 1.0) > 0.02:
            raise CameraInfoError(
                f"camera_info is {cal_w}x{cal_h}, image is {width}x{height}: not a uniform resize")
        K = scale_K(K, (cal_w, cal_h), (width, height))  # pixel centres on integers
    return K


def camera_info_for_image(info: CameraInfo, K: np.ndarray, width: int, height: int, header) -> CameraInfo:
    """camera_info describing the depth image: the image's header and size, K (and P) in its pixels."""
    out = CameraInfo()
    out.header = header
    out.width, out.height = int(width), int(height)
    out.distortion_model = info.distortion_model
    out.d = list(info.d)
    out.r = list(info.r) if any(info.r) else [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    out.k = [float(v) for v in K.ravel()]
    P = np.array(info.p, dtype=np.float64).reshape(3, 4)
    K_in = calibrated_K(info)
    # Keep the projection's translation (stereo baseline term) in the new pixel units.
    tx = P[:, 3] * (K[0, 0] / K_in[0, 0]) if K_in[0, 0] > 0 else P[:, 3]
    out.p = [float(v) for v in np.hstack([K, tx[:, None]]).ravel()]
    return out


def _fields(rgb: bool) -> list[PointField]:
    f = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1) for i, n in enumerate("xyz")]
    if rgb:
        f.append(PointField(name="rgb", offset=16, datatype=PointField.FLOAT32, count=1))
    return f


_FIELDS = {False: _fields(False), True: _fields(True)}  # shared by every cloud: never mutated


class PointCloudBuilder:
    """Back-projects depth through K; the ray grid and all per-frame buffers are cached per
    (K, size, decimation), so a camera stream allocates nothing per cloud."""

    def __init__(self):
        self._key = None
        self._rays = None  # (rx, ry), each h' x w' float32: (u - cx)/fx, (v - cy)/fy on the grid
        self._scratch = None  # (h', w', floats-per-point) -> buffers of `_buffers`
        self._buf = None  # array('B') backing the last cloud
        self._pts = None  # its float32 view, h' x w' x floats-per-point

    def _grid(self, K: np.ndarray, h: int, w: int, step: int):
        key = (K.tobytes(), h, w, step)  # exact K: a stream's camera_info repeats the same values
        if key != self._key:
            self._key, self._rays = key, ray_grid(K, h, w, step)
        return self._rays

    def _buffers(self, shape: tuple[int, int, int]) -> dict:
        if self._scratch is None or self._scratch["shape"] != shape:
            hw = shape[:2]
            self._scratch = {"shape": shape, "ok": np.empty(hw, bool), "z": np.empty(hw, np.float32),
                             "x": np.empty(hw, np.float32), "y": np.empty(hw, np.float32),
                             "bgra": np.empty(hw + (4,), np.uint8)}
            # Zeroed once: the padding floats (and rgb's 4th byte) are never written again.
            self._buf = array.array("B", bytes(4 * shape[0] * shape[1] * shape[2]))
            self._pts = np.frombuffer(self._buf, dtype="<f4").reshape(shape)
        return self._scratch

    def build(self, depth: np.ndarray, K: np.ndarray, header, valid: np.ndarray | None = None,
              rgb: np.ndarray | None = None, decimation: int = 1) -> PointCloud2:
        """depth HxW metres (NaN/<=0 invalid), valid HxW bool (extra mask), rgb HxWx3 uint8.

        The points are written straight into an array('B') that becomes msg.data without a copy;
        it is reused by the next build, so publish (rclpy serialises at once) before rebuilding."""
        s = max(int(decimation), 1)
        h, w = depth.shape
        rx, ry = self._grid(K, h, w, s)
        shape = (rx.shape[0], rx.shape[1], 8 if rgb is not None else 4)
        b = self._buffers(shape)
        z = np.ascontiguousarray(depth[::s, ::s], dtype=np.float32)
        ok = b["ok"]
        np.greater(z, 0, out=ok)  # False for NaN too
        np.logical_and(ok, np.isfinite(z), out=ok)
        if valid is not None:
            np.logical_and(ok, valid[::s, ::s], out=ok)
        # z = depth where ok else NaN, which x and y inherit: cv2's masked copy is ~4x np.where.
        zb = b["z"]
        zb.fill(np.nan)
        cv2.copyTo(z, ok.view(np.uint8), zb)
        cv2.multiply(rx, zb, dst=b["x"])
        cv2.multiply(ry, zb, dst=b["y"])
        planes, to = [b["x"], b["y"], zb], [0, 0, 1, 1, 2, 2]
        if rgb is not None:
            # PCL's packed rgb float: uint32 0x00RRGGBB little-endian = bytes b, g, r, (a = 0).
            bgra = b["bgra"]
            cv2.cvtColor(np.ascontiguousarray(rgb[::s, ::s]), cv2.COLOR_RGB2BGRA, dst=bgra)
            packed = bgra.view(np.uint32)[..., 0]
            np.bitwise_and(packed, np.uint32(0x00FFFFFF), out=packed)
            planes.append(packed.view(np.float32))
            to += [3, 4]
        # Interleave with SIMD straight into the message buffer; the padding channels stay zero.
        cv2.mixChannels(planes, [self._pts], to)
        # check_fields=True makes the data setter keep our array('B'); the default setter
        # (ROS_PYTHON_CHECK_FIELDS unset) copies it with array('B', value): 3.9 MB a cloud.
        msg = PointCloud2(check_fields=True)
        msg.header = header
        msg.height, msg.width = shape[0], shape[1]
        msg.fields = _FIELDS[rgb is not None]
        msg.is_bigendian = False
        msg.point_step = 4 * shape[2]
        msg.row_step = msg.point_step * shape[1]
        msg.is_dense = False
        msg.data = self._buf
        return msg
