"""Pair messages by timestamp: nearest-stamp lookup and a small buffer for live streams.

Pure python (bisect), no ROS: the bag readers and the ROS node both use it.
"""
from __future__ import annotations

import bisect
import collections
from typing import Any, Sequence


def stamp_ns(header) -> int:
    """A std_msgs Header's stamp (ROS 1 or 2, rclpy or rosbags message) in integer nanoseconds."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def nearest_by_stamp(sorted_stamps: Sequence[int], t: int, tolerance_ns: int | None = None) -> int | None:
    """Index of the stamp nearest to `t` in an ascending sequence, or None.

    None when the sequence is empty or the nearest stamp is more than `tolerance_ns` away
    (no tolerance = always the nearest). Ties go to the earlier stamp.
    """
    if not len(sorted_stamps):
        return None
    i = bisect.bisect_left(sorted_stamps, t)
    candidates = [j for j in (i - 1, i) if 0 <= j < len(sorted_stamps)]
    best = min(candidates, key=lambda j: (abs(sorted_stamps[j] - t), j))
    if tolerance_ns is not None and abs(sorted_stamps[best] - t) > tolerance_ns:
        return None
    return best


class StampPairer:
    """Keeps the last `capacity` messages of one stream (e.g. camera_info) to pair with another.

    `match(t)`: the message with exactly stamp t; else the nearest within `tolerance_ns`;
    else, when `fallback_latest`, the latest one seen (camera_info of a static camera);
    else None. Messages must be added in non-decreasing stamp order; an older one is
    inserted in place (out-of-order delivery happens with several publishers).
    """

    def __init__(self, capacity: int = 32, tolerance_ns: int = 0, fallback_latest: bool = True):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.tolerance_ns = tolerance_ns
        self.fallback_latest = fallback_latest
        self._stamps: collections.deque[int] = collections.deque()
        self._items: collections.deque[Any] = collections.deque()

    def __len__(self) -> int:
        return len(self._stamps)

    def add(self, stamp_ns: int, item: Any) -> None:
        if not self._stamps or stamp_ns >= self._stamps[-1]:
            self._stamps.append(stamp_ns)
            self._items.append(item)
        else:
            i = bisect.bisect_right(list(self._stamps), stamp_ns)
            self._stamps.insert(i, stamp_ns)
            self._items.insert(i, item)
        while len(self._stamps) > self.capacity:
            self._stamps.popleft()
            self._items.popleft()

    def latest(self) -> Any | None:
        return self._items[-1] if self._items else None

    def match(self, stamp_ns: int) -> Any | None:
        stamps = list(self._stamps)
        i = nearest_by_stamp(stamps, stamp_ns, self.tolerance_ns)
        if i is not None:
            return self._items[i]
        return self.latest() if self.fallback_latest else None
