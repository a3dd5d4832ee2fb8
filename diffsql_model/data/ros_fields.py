"""Message fields under their ROS 1 and ROS 2 spellings, and camera_info intrinsics, without ROS.

ROS 1 spells a few fields in capitals (CameraInfo `K`, `P`, `D`, `R`) where ROS 2 uses lower
case (`k`, `p`, ...). The helpers only read attributes, so they serve rosbags messages of either
distribution and rclpy messages alike (bag readers, bag writer, bag player, depth node).
"""
from __future__ import annotations

from typing import Collection

import numpy as np

_MISSING = object()


class MessageError(ValueError):
    """A message that lacks what it must carry (a field, a calibration, enough data)."""


def spelling(names: Collection[str], name: str) -> str | None:
    """How a message type with fields `names` spells `name`: as given, upper or lower case."""
    return next((n for n in (name, name.upper(), name.lower()) if n in names), None)


def field(msg, name: str, default=_MISSING):
    """Message field under its ROS 2 (lower-case) or ROS 1 (upper-case) name; `default` when
    the message has neither (without one: MessageError)."""
    for n in (name, name.upper(), name.lower()):
        if hasattr(msg, n):
            return getattr(msg, n)
    if default is not _MISSING:
        return default
    raise MessageError(f"{type(msg).__name__} has no field {name!r} (nor {name.upper()!r})")


def camera_matrix(info) -> np.ndarray:
    """3x3 intrinsics of the rectified image: P's left 3x3 (K where P is all zero)."""
    P = np.asarray(field(info, "p"), dtype=np.float64).reshape(3, 4)
    if P[0, 0] > 0:
        return P[:, :3].copy()
    K = np.asarray(field(info, "k"), dtype=np.float64).reshape(3, 3)
    if K[0, 0] <= 0:
        raise MessageError("camera_info carries neither P nor K (all zero): the camera is uncalibrated")
    return K


def projection_matrix(info) -> np.ndarray:
    """3x4 projection P of a camera_info ([K | 0] where P is unset)."""
    P = np.asarray(field(info, "p"), dtype=np.float64).reshape(3, 4)
    if P[0, 0] <= 0:
        P = np.hstack([camera_matrix(info), np.zeros((3, 1))])
    return P
