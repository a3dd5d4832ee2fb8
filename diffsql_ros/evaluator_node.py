"""Evaluator node: scores every depth image the depth node publishes against LiDAR ground truth.

It subscribes to the node's `depth` (and, for the report's sample frames, `depth/uncertainty`
and `points`), pairs each depth with the ground truth of its header stamp (the bag's nearest
LiDAR scan, prepared by the caller as a depth map) and scores it with the protocol code of
`diffsql-eval` (`run_evaluation`), so both tools give the same numbers for the same frames.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Optional

import numpy as np
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, PointCloud2

from diffsql_model.data.image_msgs import image_to_array
from diffsql_model.data.pairing import stamp_ns
from diffsql_model.eval import protocols
from diffsql_model.data.pointcloud_msgs import read_points

# stamp_ns -> (H x W ground-truth metres, 0 = none) or (None, reason the frame has none)
GroundTruthFn = Callable[[int], tuple]


@dataclasses.dataclass
class Sample:
    """What the report shows of one frame (kept only for the stamps asked for)."""

    depth: Optional[np.ndarray] = None
    uncertainty: Optional[np.ndarray] = None
    xyz: Optional[np.ndarray] = None
    rgb: Optional[np.ndarray] = None


class DepthEvaluator(Node):
    """Subscribes under `namespace` (where the depth node publishes) once its publishers exist."""

    def __init__(self, namespace: str, gt_for_stamp: GroundTruthFn, cfg: protocols.EvalConfig,
                 name: str = "diffsql_bag_evaluator", **node_kwargs):
        super().__init__(name, **node_kwargs)
        self.ns = namespace.rstrip("/")
        self.gt_for_stamp = gt_for_stamp
        self.samples: dict[int, Sample] = {}
        self.scoring = True  # False in the sample pass: frames replayed for pictures are not rescored
        self.received: dict[int, float] = {}  # stamp_ns -> monotonic receive time of its depth
        self._acc = protocols.Accumulator(cfg)  # per-frame metrics and missing frames, as diffsql-eval
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._subs = []
        self.scoring_s = 0.0

    # -- wiring -------------------------------------------------------------------------------
    def qos_for(self, topic: str) -> Optional[QoSProfile]:
        """QoS compatible with the topic's publisher (best effort or reliable), None if absent."""
        infos = self.get_publishers_info_by_topic(topic)
        if not infos:
            return None
        rel = infos[0].qos_profile.reliability
        best_effort = rel == ReliabilityPolicy.BEST_EFFORT
        return QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT if best_effort
                          else ReliabilityPolicy.RELIABLE)

    def connect(self, timeout_s: float, alive=lambda: True) -> None:
        """Wait for the depth node's `depth` publisher, then subscribe to its outputs."""
        topic = f"{self.ns}/depth"
        deadline = time.monotonic() + timeout_s
        qos = None
        while qos is None:
            if not alive():
                raise RuntimeError("the depth node exited before publishing 'depth'")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no publisher on {topic} after {timeout_s:.0f} s")
            qos = self.qos_for(topic)
            if qos is None:
                time.sleep(0.05)
        self._subs.append(self.create_subscription(Image, topic, self._on_depth, qos))

    def watch_samples(self, stamps, timeout_s: float) -> None:
        """Sample pass: stop scoring, keep depth, uncertainty and points of these stamps."""
        self.scoring = False
        with self._cond:
            self.samples = {s: Sample() for s in stamps}
        for suffix, cb, typ in (("depth/uncertainty", self._on_uncertainty, Image),
                                ("points", self._on_points, PointCloud2)):
            self.subscribe_to_node(typ, f"{self.ns}/{suffix}", cb, time.monotonic() + timeout_s)
        time.sleep(0.3)  # discovery is two-sided: give the node's publishers time to match us

    def subscribe_to_node(self, msg_type, topic: str, callback, deadline: float,
                          required: Optional[str] = None):
        """Subscribe to the node's `topic` with its publisher's QoS, waiting until `deadline`
        (monotonic) for the publisher, then for the match: the node only computes outputs someone
        subscribes to. `required`: the error raised when nothing publishes the topic."""
        while (qos := self.qos_for(topic)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if qos is None and required:
            raise RuntimeError(required)
        sub = self.create_subscription(msg_type, topic, callback, qos or QoSProfile(depth=10))
        self._subs.append(sub)
        while sub.get_publisher_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        return sub

    # -- callbacks ----------------------------------------------------------------------------
    def _on_depth(self, msg: Image) -> None:
        t = time.monotonic()
        stamp = stamp_ns(msg.header)
        try:
            if msg.encoding != "32FC1":
                raise ValueError(f"depth image has encoding {msg.encoding!r}, expected 32FC1")
            depth = np.array(image_to_array(msg), dtype=np.float32)  # copy: msg.data is reused
            if self.scoring:
                self._score(stamp, depth)
            elif stamp in self.samples:
                self.samples[stamp].depth = depth
        except Exception as e:  # one bad frame must not stop the run; it is reported
            self.errors.append(f"stamp {stamp}: {e}")
        finally:
            self.scoring_s += time.monotonic() - t
            with self._cond:
                if self.scoring:
                    self.received.setdefault(stamp, t)
                self._cond.notify_all()

    def _score(self, stamp: int, depth: np.ndarray) -> None:
        gt, reason = self.gt_for_stamp(stamp)
        key = f"{stamp / 1e9:.6f}"
        if gt is None:
            self._acc.missing.append({"frame": key, "reason": reason})
            return
        # The shared protocol code: same resize, mask, scaling and clipping as diffsql-eval.
        self._acc.add(key, gt, depth)

    def _on_uncertainty(self, msg: Image) -> None:
        stamp = stamp_ns(msg.header)
        if stamp in self.samples:
            self.samples[stamp].uncertainty = np.array(image_to_array(msg), dtype=np.float32)
            with self._cond:
                self._cond.notify_all()

    def _on_points(self, msg: PointCloud2) -> None:
        stamp = stamp_ns(msg.header)
        if stamp not in self.samples:
            return
        pts = read_points(msg).ravel()
        xyz = np.stack([pts["x"], pts["y"], pts["z"]], axis=1).astype(np.float32)
        ok = np.isfinite(xyz).all(axis=1)
        s = self.samples[stamp]
        s.xyz = xyz[ok]
        if "rgb" in (pts.dtype.names or ()):
            packed = np.ascontiguousarray(pts["rgb"]).view(np.uint32)[ok]  # 0x00RRGGBB
            s.rgb = np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], axis=1).astype(np.uint8)
        with self._cond:
            self._cond.notify_all()

    # -- waiting and results ------------------------------------------------------------------
    def wait_for(self, stamp: int, timeout_s: float, alive=lambda: True) -> bool:
        """Block until the depth of `stamp` arrived (True) or the timeout passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while stamp not in self.received:
                left = deadline - time.monotonic()
                if left <= 0 or not alive():
                    return stamp in self.received
                self._cond.wait(min(left, 0.2))
            return True

    def wait_for_sample(self, stamp: int, timeout_s: float, alive=lambda: True) -> bool:
        """Sample pass: until depth, uncertainty and points of `stamp` are all in (or timeout)."""
        deadline = time.monotonic() + timeout_s

        def done():
            s = self.samples.get(stamp)
            return s is not None and s.depth is not None and s.uncertainty is not None and s.xyz is not None

        with self._cond:
            while not done() and time.monotonic() < deadline and alive():
                self._cond.wait(0.2)
            return done()

    def wait_quiet(self, expected: set, timeout_s: float, alive=lambda: True, idle_s: float = 0.0) -> None:
        """After the last frame: wait until every expected stamp arrived, the timeout passed, or
        (idle_s > 0) nothing arrived for idle_s seconds: frames the node dropped never come."""
        start = time.monotonic()
        deadline = start + timeout_s
        with self._cond:
            while not expected <= set(self.received) and time.monotonic() < deadline and alive():
                last = max(self.received.values(), default=start)
                if idle_s > 0 and time.monotonic() - max(last, start) > idle_s:
                    return
                self._cond.wait(0.1)

    def result(self) -> dict:
        r = self._acc.result()
        return {k: r[k] for k in ("metrics", "scaling", "per_frame", "missing")} | {"errors": self.errors}
