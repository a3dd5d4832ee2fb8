"""The depth node's work, whoever manages the node: camera stream -> REP 118 depth, uncertainty,
colour map and point cloud, for one camera or several.

`configure` loads the model, `activate` creates every camera's topics and starts the inference
thread, `deactivate` stops both and keeps the model, `cleanup` frees it. The plain node
(`depth_node`) runs configure + activate at start; the managed one (`managed_depth_node`) runs
them on lifecycle transitions. The inference thread takes the newest frame of every camera at
once and runs them through one copy of the model as one batch. Outputs nobody subscribes to are
skipped, and with no subscriber at all the model does not run.
"""
from __future__ import annotations

import collections
import gc
import os
import threading
import time
from typing import Optional

import cv2
import numpy as np
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from sensor_msgs.msg import CompressedImage

from diffsql_model.checkpoint import CheckpointError, load_model
from diffsql_model.data.image_msgs import compressed_to_rgb8, image_to_rgb8
from diffsql_model.device import resolve_device
from diffsql_model.inference import DepthEstimator
from diffsql_model.timing import Stopwatch
from diffsql_model.yaml_config import ConfigError
from diffsql_ros.camera_stream import STAGES, CameraStream, FrameSlots, scale_config, stream_names
from diffsql_ros.node_params import check_params, declare_all, read_all

STARTUP_ERRORS = (CheckpointError, ConfigError, ValueError, OSError)


UNCERTAINTY_LOG = {"bins": "bin-distribution std (untrained: ranks errors no better than random)",
                   "head": "trained head"}


class DepthPipeline:
    def __init__(self, node):
        self.node = node
        declare_all(node)
        self.settings = read_all(node)
        check_params(self.settings)
        self.estimator: Optional[DepthEstimator] = None
        self.streams: list[CameraStream] = []
        self.worker: Optional[threading.Thread] = None
        self.batch_sizes = collections.deque(maxlen=100)  # frames per model call
        node.add_on_set_parameters_callback(self._on_set_parameters)

    # -- lifecycle ---------------------------------------------------------------------------
    def configure(self) -> None:
        """Load the model and warm it up; raises one of STARTUP_ERRORS with the reason."""
        s = self.settings
        if not s["checkpoint"]:
            raise CheckpointError("parameter 'checkpoint' is empty: pass the path of a DiffSQL checkpoint")
        device = resolve_device(s["device"])
        # Frozen SD comes in the run precision's dtypes: autocast does not re-cast it every frame.
        model, cfg = load_model(s["checkpoint"], device, sd_path=s["sd_path"] or None, precision=s["precision"])
        size = (s["input_height"], s["input_width"]) if s["input_height"] and s["input_width"] else None
        cameras = len(stream_names(s["cameras"]))
        self.estimator = DepthEstimator(model, cfg, str(device), s["precision"], size, tf32=s["tf32"],
                                        runtime=s["runtime"], max_batch=cameras)
        # Before the subscriptions: the first camera frame must not pay cuDNN autotuning and
        # allocator growth (seconds for SD on a GPU).
        warmup_ms = self.estimator.warmup()
        self.node.get_logger().info(
            f"loaded {s['checkpoint']} ({cfg.backbone}, network input {self.estimator.net_size}, "
            f"uncertainty: {UNCERTAINTY_LOG[cfg.uncertainty]}) "
            f"on {device} in {s['precision']}{' with TF32' if self.estimator.tf32 else ''}; "
            f"warm-up inference {warmup_ms:.0f} ms")

    def activate(self) -> None:
        names = stream_names(self.settings["cameras"])
        self.slots = FrameSlots(len(names))
        self.streams = [CameraStream(self.node, n, i, self.slots, self.settings) for i, n in enumerate(names)]
        self.diag_pub = self.node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.diag_timer = self.node.create_timer(self.settings["diagnostics_period"], self._publish_diagnostics)
        self._stop = threading.Event()
        self.worker = threading.Thread(target=self._run, name="depth_inference", daemon=True)
        self.worker.start()
        if len(names) > 1:
            self.node.get_logger().info(f"serving {len(names)} cameras: {', '.join(names)}")

    def deactivate(self) -> None:
        if self.worker is None:
            return
        self._stop.set()
        self.slots.close()
        self.worker.join(timeout=10.0)
        self.worker = None
        self.node.destroy_timer(self.diag_timer)
        self.node.destroy_publisher(self.diag_pub)
        for stream in self.streams:
            stream.destroy()
        self.streams = []

    def cleanup(self) -> None:
        """Free the model (and its GPU memory)."""
        self.deactivate()
        cuda = self.estimator is not None and self.estimator.cuda
        self.estimator = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    # -- parameters --------------------------------------------------------------------------
    def _on_set_parameters(self, params) -> SetParametersResult:
        new = dict(self.settings)
        new.update({p.name: p.value for p in params})
        try:
            check_params(new)
            scale_cfg = scale_config(new)
        except (ConfigError, ValueError) as e:
            return SetParametersResult(successful=False, reason=str(e))
        for stream in self.streams:
            stream.configure(new, scale_cfg)
        self.settings = new  # one atomic swap: the worker reads a consistent snapshot
        return SetParametersResult(successful=True)

    # -- inference thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self.slots.take_all(timeout=0.2)
            if batch and not self._stop.is_set():
                self._process(batch)

    def _process(self, batch: list) -> None:
        """The waiting frame of each camera: convert each, one model call for all, publish each.
        A bad frame is dropped (counted, logged) and never takes the others down."""
        s = self.settings
        frames = []
        for cam, (msg, t_recv) in batch:
            stream = self.streams[cam]
            want = stream.wanted(s)
            if not any(want.values()):
                continue
            watch = Stopwatch(STAGES)
            try:
                with watch("conversion"):
                    rgb = compressed_to_rgb8(msg) if isinstance(msg, CompressedImage) else image_to_rgb8(msg)
            except Exception as e:  # bad input must never kill the node: log, go on
                stream.bad_frame(e)
                continue
            frames.append((stream, msg, t_recv, rgb, want, watch))
        if frames:
            self.batch_sizes.append(len(frames))
        for (stream, msg, t_recv, rgb, want, watch), result in zip(frames, self._predict([f[3] for f in frames])):
            try:
                if isinstance(result, Exception):
                    raise result
                (depth, unc), timing = result
                for key, ms in timing.items():  # preprocess_ms, model_ms, postprocess_ms
                    watch.add(key.removesuffix("_ms"), ms)
                image_hw = rgb.shape[:2]
                if s["points.rgb"] and want["points"] and image_hw != depth.shape:  # output_resolution: network
                    rgb = cv2.resize(rgb, depth.shape[::-1], interpolation=cv2.INTER_AREA)
                stream.publish(msg, rgb, image_hw, depth, unc, s, want, watch)
                stream.record(watch.ms, time.perf_counter() - t_recv)
            except Exception as e:
                stream.bad_frame(e)

    def _predict(self, rgbs: list) -> list:
        """[((depth, uncertainty), timing ms) or the exception, per frame]: one batch, or frame by
        frame when the batch fails, so that a bad frame costs only itself."""
        if not rgbs:
            return []
        full = self.settings["output_resolution"] == "input"
        try:
            maps = self.estimator.predict_batch(rgbs, full_size=full)
            return [(m, dict(self.estimator.timing)) for m in maps]
        except Exception as e:
            if len(rgbs) == 1:
                return [e]
        results = []
        for rgb in rgbs:
            try:
                results.append((self.estimator.predict(rgb, full_size=full), dict(self.estimator.timing)))
            except Exception as e:
                results.append(e)
        return results

    # -- diagnostics -------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        est = self.estimator
        batch = list(self.batch_sizes)
        device = {"device": str(est.device), "precision": est.precision, "tf32": str(est.tf32).lower(),
                  "batch size (mean)": f"{np.mean(batch):.2f}" if batch else "nan"}
        name = self.node.get_fully_qualified_name()
        arr = DiagnosticArray(status=[s.status(now, name, device) for s in self.streams])
        arr.header.stamp = self.node.get_clock().now().to_msg()
        self.diag_pub.publish(arr)


def spin(make_node, args=None) -> int:
    """rclpy init, the node, spin until Ctrl-C, clean shutdown. Exit code 1 when the node cannot
    start (the reason logged)."""
    # AUTO: the publication mode comes from the Fast DDS XML profile, else Fast DDS's default
    # (synchronous, as rmw_fastrtps's own default). config/fastdds_large_data.xml asks for
    # asynchronous writers, which pays off only with its large shared memory (bench/node_latency.py).
    # Read when the DDS participant is made; a value the user set wins.
    os.environ.setdefault("RMW_FASTRTPS_PUBLICATION_MODE", "AUTO")
    rclpy.init(args=args)
    try:
        node = make_node()
    except STARTUP_ERRORS as e:
        rclpy.logging.get_logger("depth_node").fatal(f"cannot start: {e}")
        rclpy.try_shutdown()
        return 1
    # Objects made so far (torch, the model) live until exit: untracked, the interpreter's
    # shutdown skips collecting them (seconds; launch sends SIGTERM after 5 s of Ctrl-C).
    gc.freeze()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.pipeline.cleanup()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
