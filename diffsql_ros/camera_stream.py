"""One camera of the depth node: its subscriptions and publishers (in the camera's namespace),
its camera_info pairing, scale, point cloud builder and counters; and the mailboxes that hand
the newest frame of every camera to the inference thread.

Callbacks only park the newest image of their camera; the inference thread takes the waiting
frame of every camera at once, so frames that arrive together run through the model as one
batch and a slow model drops stale frames per camera (counted) instead of queueing them.
"""
from __future__ import annotations

import collections
import re
import threading
import time
from typing import Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from diffsql_model.colormaps import colorize_inverse_depth
from diffsql_model.data.augment import scale_K
from diffsql_model.data.pairing import StampPairer, stamp_ns
from diffsql_model.timing import Stopwatch
from diffsql_model.yaml_config import ConfigError
from diffsql_ros.conversions import array_to_image
from diffsql_ros.pointcloud import CameraInfoError, PointCloudBuilder, camera_info_for_image, intrinsics_for_image
from diffsql_ros.postprocess import postprocess
from diffsql_ros.scale import ScaleConfig, ScaleEstimator

STAGES = ("conversion", "preprocess", "model", "postprocess", "pointcloud", "publish")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*")
OUTPUTS = ("depth", "depth/camera_info", "points", "depth/uncertainty", "depth/colored")


class FrameSlots:
    """One-frame mailbox per camera under one condition: a new frame replaces its camera's
    unprocessed one (which counts as dropped); `take_all` returns every waiting frame."""

    def __init__(self, n: int):
        self._cv = threading.Condition()
        self._items: list = [None] * n
        self._closed = False
        self.dropped = [0] * n

    def put(self, camera: int, item) -> None:
        with self._cv:
            if self._items[camera] is not None:
                self.dropped[camera] += 1
            self._items[camera] = item
            self._cv.notify()

    def take_all(self, timeout: float) -> list:
        """[(camera index, item), ...] of the cameras with a waiting frame; [] after `timeout`."""
        with self._cv:
            self._cv.wait_for(lambda: self._closed or any(i is not None for i in self._items), timeout)
            taken = [(c, item) for c, item in enumerate(self._items) if item is not None]
            self._items = [None] * len(self._items)
            return taken

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


def scale_config(settings: dict) -> ScaleConfig:
    return ScaleConfig.from_dict({k[len("scale."):]: v for k, v in settings.items() if k.startswith("scale.")})


class CameraStream:
    """`name`: the camera's namespace relative to the node ('' = the node's own): topics
    `<name>/image` (or `<name>/image/compressed`), `<name>/camera_info` in and `<name>/depth`,
    ... out."""

    def __init__(self, node, name: str, index: int, slots: FrameSlots, settings: dict):
        self.node, self.name, self.index, self.slots = node, name, index, slots
        s = settings
        self.scaler = ScaleEstimator(scale_config(s))
        self.clouds = PointCloudBuilder()
        self.infos = StampPairer(capacity=32, tolerance_ns=int(s["camera_info_tolerance"] * 1e9))
        self.info_lock = threading.Lock()  # camera_info arrives on the executor, is read by the worker
        self.lock = threading.Lock()  # guards the statistics below
        self.received = self.processed = self.bad_frames = 0
        self.last_scale = 1.0
        self.latencies = collections.deque(maxlen=100)
        self.stage_ms = {k: collections.deque(maxlen=100) for k in STAGES}
        self.last_diag = (time.monotonic(), 0, 0)
        self.last_image = self.last_info = None  # monotonic times: a camera_info-only stream is diagnosed
        self.started = time.monotonic()

        prefix = f"{name}/" if name else ""
        in_qos = qos_profile_sensor_data if s["input_qos"] == "sensor_data" else QoSProfile(depth=5)
        if s["image_transport"] == "compressed":
            self.image_sub = node.create_subscription(CompressedImage, prefix + "image/compressed",
                                                      self._on_image, in_qos)
        else:
            self.image_sub = node.create_subscription(Image, prefix + "image", self._on_image, in_qos)
        self.info_sub = node.create_subscription(CameraInfo, prefix + "camera_info", self._on_info, in_qos)
        rel = ReliabilityPolicy.RELIABLE if s["output_reliability"] == "reliable" else ReliabilityPolicy.BEST_EFFORT
        out_qos = QoSProfile(depth=2, reliability=rel)
        types = {"depth": Image, "depth/camera_info": CameraInfo, "points": PointCloud2,
                 "depth/uncertainty": Image, "depth/colored": Image}
        self.pub = {k: node.create_publisher(types[k], prefix + k, out_qos) for k in OUTPUTS}

    def destroy(self) -> None:
        for entity in (self.image_sub, self.info_sub):
            self.node.destroy_subscription(entity)
        for p in self.pub.values():
            self.node.destroy_publisher(p)

    def configure(self, settings: dict, scale_cfg: ScaleConfig) -> None:
        """The runtime-changeable settings that live in the stream."""
        if scale_cfg.mode != self.scaler.cfg.mode:
            self.scaler.reset()
        self.scaler.cfg = scale_cfg
        with self.info_lock:
            self.infos.tolerance_ns = int(settings["camera_info_tolerance"] * 1e9)

    # -- callbacks (executor thread) ---------------------------------------------------------
    def _on_image(self, msg) -> None:
        with self.lock:
            self.received += 1
            self.last_image = time.monotonic()
        self.slots.put(self.index, (msg, time.perf_counter()))

    def _on_info(self, msg: CameraInfo) -> None:
        self.last_info = time.monotonic()
        stamp = stamp_ns(msg.header)
        with self.info_lock:
            latest = self.infos.latest()
            if latest is not None and stamp < stamp_ns(latest.header) - 1_000_000_000:
                # Time jumped back (bag loop, sim restart): stale future stamps would win every match.
                self.node.get_logger().warning(f"{self._label()}camera_info stamps jumped back: forgetting "
                                               "older camera_info", throttle_duration_sec=5.0)
                self.infos = StampPairer(capacity=32, tolerance_ns=self.infos.tolerance_ns)
            self.infos.add(stamp, msg)

    def _label(self) -> str:
        return f"camera {self.name}: " if self.name else ""

    # -- inference thread --------------------------------------------------------------------
    def wanted(self, s: dict) -> dict:
        return {k: s["publish." + k.replace("depth/", "")] and pub.get_subscription_count() > 0
                for k, pub in self.pub.items() if k != "depth/camera_info"}

    def camera(self, header, image_hw: tuple, depth_hw: tuple):
        """(K, depth camera_info) for the image's stamp: K of the image_hw camera image, scaled to
        the published depth's depth_hw (output_resolution network; either scale per axis: the
        network input need not keep the camera's aspect). (None, None) without a fitting
        camera_info: depth is still published, points are not."""
        with self.info_lock:
            info_msg = self.infos.match(stamp_ns(header))
        if info_msg is None:
            self.node.get_logger().warning(f"{self._label()}no camera_info received yet: publishing depth "
                                           "without points", throttle_duration_sec=5.0)
            return None, None
        try:
            K = intrinsics_for_image(info_msg, image_hw[1], image_hw[0])
            if tuple(depth_hw) != tuple(image_hw):
                K = scale_K(K, image_hw[::-1], depth_hw[::-1])
            return K, camera_info_for_image(info_msg, K, depth_hw[1], depth_hw[0], header)
        except CameraInfoError as e:
            self.node.get_logger().error(f"{self._label()}camera_info does not fit the image: {e}",
                                         throttle_duration_sec=2.0)
            return None, None

    def publish(self, msg, rgb: np.ndarray, image_hw: tuple, depth: np.ndarray, unc: np.ndarray, s: dict,
                want: dict, watch: Stopwatch) -> None:
        """One frame's outputs, depth first: its consumers do not wait for the cloud and the colour
        map. `rgb` is at the depth's size (the cloud's colours), `image_hw` the camera image's."""
        with watch("postprocess"):
            K, info = self.camera(msg.header, image_hw, depth.shape)
            scale = self.scaler.update(depth, K)
            out = postprocess(depth, unc, scale, s, points=want["points"] and K is not None)
        with watch("publish"):
            if want["depth"]:
                self.pub["depth"].publish(array_to_image(out.depth, "32FC1", msg.header))
                if info is not None:
                    self.pub["depth/camera_info"].publish(info)
        with watch("pointcloud"):
            cloud = None if out.valid is None else self.clouds.build(
                out.depth, K, msg.header, out.valid, rgb if s["points.rgb"] else None, s["points.decimation"])
        with watch("publish"):
            if cloud is not None:
                self.pub["points"].publish(cloud)
            if want["depth/uncertainty"]:
                self.pub["depth/uncertainty"].publish(array_to_image(out.uncertainty, "32FC1", msg.header))
        if want["depth/colored"]:
            with watch("postprocess"):
                colored = colorize_inverse_depth(out.depth, s["min_depth"], s["max_depth"])
            with watch("publish"):
                self.pub["depth/colored"].publish(array_to_image(colored, "rgb8", msg.header))
        with self.lock:
            self.last_scale = scale

    def record(self, stage_ms: dict, latency_s: float) -> None:
        with self.lock:
            self.processed += 1
            self.latencies.append(latency_s)
            for k, v in stage_ms.items():
                self.stage_ms[k].append(v)

    def bad_frame(self, error: Exception) -> None:
        with self.lock:
            self.bad_frames += 1
        self.node.get_logger().error(f"{self._label()}dropped a frame: {type(error).__name__}: {error}",
                                     throttle_duration_sec=2.0)

    # -- diagnostics -------------------------------------------------------------------------
    def status(self, now: float, node_name: str, device_values: dict) -> DiagnosticStatus:
        with self.lock:
            t0, rec0, proc0 = self.last_diag
            dt = max(now - t0, 1e-6)
            rate_in, rate_out = (self.received - rec0) / dt, (self.processed - proc0) / dt
            self.last_diag = (now, self.received, self.processed)
            lat = list(self.latencies)
            # Medians: a warm-up or GC outlier should not dominate the reported cost of a stage.
            stages = {k: (float(np.median(v)) if v else 0.0) for k, v in self.stage_ms.items()}
            values = {"input rate (Hz)": f"{rate_in:.2f}", "output rate (Hz)": f"{rate_out:.2f}",
                      "latency mean (ms)": f"{1e3 * np.mean(lat):.1f}" if lat else "nan",
                      "latency max (ms)": f"{1e3 * np.max(lat):.1f}" if lat else "nan",
                      "received frames": str(self.received), "processed frames": str(self.processed),
                      "dropped frames": str(self.slots.dropped[self.index]), "bad frames": str(self.bad_frames),
                      **device_values, "scale": f"{self.last_scale:.4f}"}
        values.update({f"{k} (ms)": f"{v:.2f}" for k, v in stages.items()})
        suffix = f" ({self.name})" if self.name else ""
        status = DiagnosticStatus(name=f"{node_name}: depth inference{suffix}", hardware_id=values["device"],
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        starved = self._images_lost(now)
        if starved:
            status.level, status.message = DiagnosticStatus.WARN, starved
            self.node.get_logger().warning(
                f"{self._label()}{starved}. With Fast DDS's defaults, best-effort frames over 512 KB can be lost "
                f"between processes; run the camera and this node with config/fastdds_large_data.xml "
                f"(FASTDDS_DEFAULT_PROFILES_FILE); or the image topic, encoding type or QoS does not match",
                throttle_duration_sec=30.0)
        elif self.received == 0:
            status.level, status.message = DiagnosticStatus.WARN, "no images received"
        elif rate_in > 0 and rate_out < 0.5 * rate_in:
            status.level, status.message = DiagnosticStatus.WARN, "model slower than the camera: dropping frames"
        else:
            status.level, status.message = DiagnosticStatus.OK, "running"
        return status

    def _images_lost(self, now: float) -> str:
        """A camera that publishes camera_info and has an image publisher, but whose images have
        not arrived for 5 s: the symptom of big best-effort frames lost in transport."""
        last_image = self.last_image or self.started
        if (self.last_info is None or now - self.last_info > 2.0 or now - last_image < 5.0
                or self.image_sub.get_publisher_count() == 0):
            return ""
        return f"camera_info arrives but no image for {now - last_image:.0f} s"


def stream_names(cameras: Optional[list]) -> list[str]:
    """The `cameras` parameter -> namespaces; unset or empty = one camera in the node's namespace."""
    names = [str(c).strip("/") for c in (cameras or [])]
    for n in names:
        if not _NAME.fullmatch(n):
            raise ConfigError(f"parameter cameras: {n!r} is not a relative ROS namespace "
                              "(letters, digits, _ and /, not starting with a digit)")
    if len(set(names)) != len(names):
        raise ConfigError(f"parameter cameras lists a namespace twice: {names}")
    return names or [""]
