"""ROS 2 depth node: camera stream -> REP 118 depth, uncertainty, colour map, point cloud.

Callbacks only park the newest image in a one-slot mailbox; an inference thread takes it,
so a slow model drops stale frames (counted) instead of queueing them. Outputs nobody
subscribes to are skipped, and with no subscriber at all the model does not run.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from diffsql_model.checkpoint import CheckpointError, load_model
from diffsql_model.colormaps import colorize_inverse_depth
from diffsql_model.data.image_msgs import compressed_to_rgb8, image_to_rgb8
from diffsql_model.data.pairing import StampPairer, stamp_ns
from diffsql_model.device import resolve_device
from diffsql_model.inference import DepthEstimator
from diffsql_model.timing import Stopwatch
from diffsql_model.yaml_config import ConfigError
from diffsql_ros.conversions import array_to_image
from diffsql_ros.node_params import PARAMETERS, check_params, declare_all
from diffsql_ros.pointcloud import CameraInfoError, PointCloudBuilder, camera_info_for_image, intrinsics_for_image
from diffsql_ros.postprocess import postprocess
from diffsql_ros.scale import ScaleConfig, ScaleEstimator

SUBSCRIBED_TOPICS = {"image": Image, "image/compressed": CompressedImage, "camera_info": CameraInfo}
PUBLISHED_TOPICS = {"depth": Image, "depth/camera_info": CameraInfo, "points": PointCloud2,
                    "depth/uncertainty": Image, "depth/colored": Image, "/diagnostics": DiagnosticArray}
STAGES = ("conversion", "preprocess", "model", "postprocess", "pointcloud", "publish")


class FrameSlot:
    """One-frame mailbox: a new frame replaces an unprocessed one (which counts as dropped)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._item = None
        self._closed = False
        self.dropped = 0

    def put(self, item):
        with self._cv:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cv.notify()

    def take(self, timeout: float):
        with self._cv:
            self._cv.wait_for(lambda: self._item is not None or self._closed, timeout)
            item, self._item = self._item, None
            return item

    def close(self):
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class DepthNode(Node):
    def __init__(self, **kwargs):
        super().__init__("depth_node", **kwargs)
        declare_all(self)
        self.settings = {p.name: self.get_parameter(p.name).value for p in PARAMETERS}
        check_params(self.settings)
        s = self.settings
        if not s["checkpoint"]:
            raise CheckpointError("parameter 'checkpoint' is empty: pass the path of a DiffSQL checkpoint")
        device = resolve_device(s["device"])
        # Frozen SD comes in the run precision's dtypes: autocast does not re-cast it every frame.
        model, cfg = load_model(s["checkpoint"], device, sd_path=s["sd_path"] or None, precision=s["precision"])
        size = (s["input_height"], s["input_width"]) if s["input_height"] and s["input_width"] else None
        self.estimator = DepthEstimator(model, cfg, str(device), s["precision"], size, tf32=s["tf32"])
        # Before the subscriptions: the first camera frame must not pay cuDNN autotuning and
        # allocator growth (seconds for SD on a GPU).
        warmup_ms = self.estimator.warmup()
        self.get_logger().info(
            f"loaded {s['checkpoint']} ({cfg.backbone}, network input {self.estimator.net_size}) "
            f"on {device} in {s['precision']}{' with TF32' if self.estimator.tf32 else ''}; "
            f"warm-up inference {warmup_ms:.0f} ms")
        self.scaler = ScaleEstimator(self._scale_config(s))
        self.clouds = PointCloudBuilder()
        self.infos = StampPairer(capacity=32, tolerance_ns=int(s["camera_info_tolerance"] * 1e9))
        self._info_lock = threading.Lock()  # camera_info arrives on the executor, is read by the worker
        self.slot = FrameSlot()
        self._lock = threading.Lock()  # guards the statistics below
        self.received = self.processed = self.bad_frames = 0
        self.last_scale = 1.0
        self.latencies = collections.deque(maxlen=100)
        self.stage_ms = {k: collections.deque(maxlen=100) for k in STAGES}
        self._last_diag = (time.monotonic(), 0, 0)
        self._last_image = self._last_info = None  # monotonic times: a camera_info-only stream is diagnosed
        self._started = time.monotonic()
        self.add_on_set_parameters_callback(self._on_set_parameters)

        in_qos = qos_profile_sensor_data if s["input_qos"] == "sensor_data" else QoSProfile(depth=5)
        if s["image_transport"] == "compressed":
            self.image_sub = self.create_subscription(CompressedImage, "image/compressed", self._on_image, in_qos)
        else:
            self.image_sub = self.create_subscription(Image, "image", self._on_image, in_qos)
        self.create_subscription(CameraInfo, "camera_info", self._on_info, in_qos)
        rel = ReliabilityPolicy.RELIABLE if s["output_reliability"] == "reliable" else ReliabilityPolicy.BEST_EFFORT
        out_qos = QoSProfile(depth=2, reliability=rel)
        self.pub = {"depth": self.create_publisher(Image, "depth", out_qos),
                    "depth/camera_info": self.create_publisher(CameraInfo, "depth/camera_info", out_qos),
                    "points": self.create_publisher(PointCloud2, "points", out_qos),
                    "depth/uncertainty": self.create_publisher(Image, "depth/uncertainty", out_qos),
                    "depth/colored": self.create_publisher(Image, "depth/colored", out_qos)}
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(s["diagnostics_period"], self._publish_diagnostics)
        self._stop = threading.Event()
        self.worker = threading.Thread(target=self._run, name="depth_inference", daemon=True)
        self.worker.start()

    # -- parameters --------------------------------------------------------------------------
    @staticmethod
    def _scale_config(s) -> ScaleConfig:
        return ScaleConfig.from_dict({k[len("scale."):]: v for k, v in s.items() if k.startswith("scale.")})

    def _on_set_parameters(self, params) -> SetParametersResult:
        new = dict(self.settings)
        new.update({p.name: p.value for p in params})
        try:
            check_params(new)
            scale_cfg = self._scale_config(new)
        except (ConfigError, ValueError) as e:
            return SetParametersResult(successful=False, reason=str(e))
        if scale_cfg.mode != self.scaler.cfg.mode:
            self.scaler.reset()
        self.scaler.cfg = scale_cfg
        with self._info_lock:
            self.infos.tolerance_ns = int(new["camera_info_tolerance"] * 1e9)
        self.settings = new  # one atomic swap: the worker reads a consistent snapshot
        return SetParametersResult(successful=True)

    # -- callbacks (executor thread) ---------------------------------------------------------
    def _on_image(self, msg):
        with self._lock:
            self.received += 1
            self._last_image = time.monotonic()
        self.slot.put((msg, time.perf_counter()))

    def _on_info(self, msg: CameraInfo):
        self._last_info = time.monotonic()
        stamp = stamp_ns(msg.header)
        with self._info_lock:
            latest = self.infos.latest()
            if latest is not None and stamp < stamp_ns(latest.header) - 1_000_000_000:
                # Time jumped back (bag loop, sim restart): stale future stamps would win every match.
                self.get_logger().warning("camera_info stamps jumped back: forgetting older camera_info",
                                          throttle_duration_sec=5.0)
                self.infos = StampPairer(capacity=32, tolerance_ns=self.infos.tolerance_ns)
            self.infos.add(stamp, msg)

    # -- inference thread --------------------------------------------------------------------
    def _run(self):
        while not self._stop.is_set():
            item = self.slot.take(timeout=0.2)
            if item is None:
                continue
            try:
                self._process(*item)
            except Exception as e:  # bad input must never kill the node: log, go on
                with self._lock:
                    self.bad_frames += 1
                self.get_logger().error(f"dropped a frame: {type(e).__name__}: {e}", throttle_duration_sec=2.0)

    def _wanted(self, s) -> dict:
        return {k: s["publish." + k.replace("depth/", "")] and pub.get_subscription_count() > 0
                for k, pub in self.pub.items() if k != "depth/camera_info"}

    def _process(self, msg, t_recv: float):
        s = self.settings
        want = self._wanted(s)
        if not any(want.values()):
            return
        watch = Stopwatch(STAGES)
        with watch("conversion"):
            rgb = compressed_to_rgb8(msg) if isinstance(msg, CompressedImage) else image_to_rgb8(msg)
        depth, unc = self.estimator.predict(rgb)
        for key, ms in self.estimator.timing.items():  # preprocess_ms, model_ms, postprocess_ms
            watch.add(key.removesuffix("_ms"), ms)
        with watch("postprocess"):
            K, info = self._camera(msg.header, *depth.shape)
            scale = self.scaler.update(depth, K)
            out = postprocess(depth, unc, scale, s, points=want["points"] and K is not None)
        # Depth first: its consumers do not wait for the cloud and the colour map.
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
        self._publish_colored(out.depth, msg.header, s, want["depth/colored"], watch)
        self._record(watch.ms, time.perf_counter() - t_recv, scale)

    def _camera(self, header, height: int, width: int):
        """(K, depth camera_info) for the image's stamp and size; (None, None) without a fitting
        camera_info (depth is still published, points are not)."""
        with self._info_lock:
            info_msg = self.infos.match(stamp_ns(header))
        if info_msg is None:
            self.get_logger().warning("no camera_info received yet: publishing depth without points",
                                      throttle_duration_sec=5.0)
            return None, None
        try:
            K = intrinsics_for_image(info_msg, width, height)
            return K, camera_info_for_image(info_msg, K, width, height, header)
        except CameraInfoError as e:
            self.get_logger().error(f"camera_info does not fit the image: {e}", throttle_duration_sec=2.0)
            return None, None

    def _publish_colored(self, depth, header, s, wanted: bool, watch: Stopwatch):
        if not wanted:
            return
        with watch("postprocess"):
            colored = colorize_inverse_depth(depth, s["min_depth"], s["max_depth"])
        with watch("publish"):
            self.pub["depth/colored"].publish(array_to_image(colored, "rgb8", header))

    def _record(self, stage_ms: dict, latency_s: float, scale: float):
        with self._lock:
            self.processed += 1
            self.latencies.append(latency_s)
            for k, v in stage_ms.items():
                self.stage_ms[k].append(v)
            self.last_scale = scale

    # -- diagnostics -------------------------------------------------------------------------
    def _publish_diagnostics(self):
        now = time.monotonic()
        with self._lock:
            t0, rec0, proc0 = self._last_diag
            dt = max(now - t0, 1e-6)
            rate_in, rate_out = (self.received - rec0) / dt, (self.processed - proc0) / dt
            self._last_diag = (now, self.received, self.processed)
            lat = list(self.latencies)
            # Medians: a warm-up or GC outlier should not dominate the reported cost of a stage.
            stages = {k: (float(np.median(v)) if v else 0.0) for k, v in self.stage_ms.items()}
            values = {"input rate (Hz)": f"{rate_in:.2f}", "output rate (Hz)": f"{rate_out:.2f}",
                      "latency mean (ms)": f"{1e3 * np.mean(lat):.1f}" if lat else "nan",
                      "latency max (ms)": f"{1e3 * np.max(lat):.1f}" if lat else "nan",
                      "received frames": str(self.received), "processed frames": str(self.processed),
                      "dropped frames": str(self.slot.dropped), "bad frames": str(self.bad_frames),
                      "device": str(self.estimator.device), "precision": self.estimator.precision,
                      "tf32": str(self.estimator.tf32).lower(),
                      "scale": f"{self.last_scale:.4f}"}
        values.update({f"{k} (ms)": f"{v:.2f}" for k, v in stages.items()})
        status = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: depth inference",
                                  hardware_id=values["device"],
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        starved = self._images_lost(now)
        if starved:
            status.level, status.message = DiagnosticStatus.WARN, starved
            self.get_logger().warning(
                f"{starved}. With Fast DDS's defaults, best-effort frames over 512 KB can be lost between "
                f"processes; run the camera and this node with config/fastdds_large_data.xml "
                f"(FASTDDS_DEFAULT_PROFILES_FILE); or the image topic, encoding type or QoS does not match",
                throttle_duration_sec=30.0)
        elif self.received == 0:
            status.level, status.message = DiagnosticStatus.WARN, "no images received"
        elif rate_in > 0 and rate_out < 0.5 * rate_in:
            status.level, status.message = DiagnosticStatus.WARN, "model slower than the camera: dropping frames"
        else:
            status.level, status.message = DiagnosticStatus.OK, "running"
        arr = DiagnosticArray(status=[status])
        arr.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(arr)

    def _images_lost(self, now: float) -> str:
        """A camera that publishes camera_info and has an image publisher, but whose images have
        not arrived for 5 s: the symptom of big best-effort frames lost in transport."""
        last_image = self._last_image or self._started
        if (self._last_info is None or now - self._last_info > 2.0 or now - last_image < 5.0
                or self.image_sub.get_publisher_count() == 0):
            return ""
        return f"camera_info arrives but no image for {now - last_image:.0f} s"

    def stop(self):
        self._stop.set()
        self.slot.close()
        self.worker.join(timeout=5.0)


def main(args=None) -> int:
    # AUTO: the publication mode comes from the Fast DDS XML profile, else Fast DDS's default
    # (synchronous, as rmw_fastrtps's own default). config/fastdds_large_data.xml asks for
    # asynchronous writers, which pays off only with its large shared memory (bench/node_latency.py).
    # Read when the DDS participant is made; a value the user set wins.
    os.environ.setdefault("RMW_FASTRTPS_PUBLICATION_MODE", "AUTO")
    rclpy.init(args=args)
    try:
        node = DepthNode()
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        rclpy.logging.get_logger("depth_node").fatal(f"cannot start: {e}")
        rclpy.try_shutdown()
        return 1
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.stop()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
