"""End-to-end latency of the depth node: publish an image, time until `depth` (and `points`)
arrive in this process (which subscribes to every output unless --outputs names fewer: the
node skips outputs nobody listens to), and the node's own per-stage medians from /diagnostics.

  .venv/bin/python bench/node_latency.py [--frames 15] [--sizes 192x640 375x1242]
  .venv/bin/python bench/node_latency.py --best-effort --sizes 192x640 480x640 [--large-data-profile]

--best-effort publishes the frames as a camera driver does (sensor-data QoS) to the node's default
best-effort subscription and counts the frames it answers; --large-data-profile runs the node and
this process with config/fastdds_large_data.xml (its shared-memory part: diffsql_ros.dds_profile),
whose writers are asynchronous. RMW_FASTRTPS_PUBLICATION_MODE=SYNCHRONOUS (or ASYNCHRONOUS) in the
environment overrides the node's AUTO, to compare the modes.

The node is the real console script with config/depth.yaml in a subprocess, loading a lite
checkpoint with random weights (network input 192x640). Frames are sent one at a time so
nothing is dropped: the numbers are per-frame cost, not throughput.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import cv2
import numpy as np
import rclpy
import torch
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffsql_model.checkpoint import save_checkpoint  # noqa: E402
from diffsql_model.data.calib import load_kitti_calib  # noqa: E402
from diffsql_model.depth_net import DiffSQLDepth  # noqa: E402
from diffsql_model.presets import get_preset  # noqa: E402
from diffsql_ros.conversions import array_to_image  # noqa: E402
from diffsql_ros.dds_profile import PROFILE, shm_only  # noqa: E402

SHARED = pathlib.Path(os.environ.get("DIFFSQL_SHARED", ROOT.parent / "shared")).resolve()
DATE_DIR = SHARED / "data/kitti/raw/2011_09_26"
FRAME = DATE_DIR / "2011_09_26_drive_0001_sync/image_02/data/0000000000.png"
OUTPUTS = {"depth": Image, "depth/camera_info": CameraInfo, "points": PointCloud2,
           "depth/uncertainty": Image, "depth/colored": Image}  # topic -> type
STAGES = ("conversion", "preprocess", "model", "postprocess", "pointcloud", "publish")


class Bench:
    def __init__(self, outputs, best_effort=False):
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        self.node = rclpy.create_node("latency_bench", context=self.ctx)
        qos = QoSProfile(depth=5)
        camera_qos = qos_profile_sensor_data if best_effort else qos
        self.pub_img = self.node.create_publisher(Image, "image", camera_qos)
        self.pub_info = self.node.create_publisher(CameraInfo, "camera_info", camera_qos)
        self.got = {}
        self.diag = {}
        self.cv = threading.Condition()
        self.subs = {topic: self.node.create_subscription(OUTPUTS[topic], topic, lambda m, t=topic: self._rx(t, m), qos)
                     for topic in {"depth", "points", *outputs}}
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.ex = SingleThreadedExecutor(context=self.ctx)
        self.ex.add_node(self.node)
        threading.Thread(target=self.ex.spin, daemon=True).start()

    def _rx(self, topic, msg):
        with self.cv:
            self.got[(topic, msg.header.stamp.sec)] = time.perf_counter()
            self.cv.notify_all()

    def _on_diag(self, msg):
        with self.cv:
            self.diag = {kv.key: kv.value for s in msg.status for kv in s.values}

    def send(self, image: Image, info: CameraInfo, sec: int, timeout=30.0):
        image.header.stamp = info.header.stamp = Time(sec=sec)
        t0 = time.perf_counter()
        self.pub_info.publish(info)
        self.pub_img.publish(image)
        with self.cv:
            ok = self.cv.wait_for(lambda: ("depth", sec) in self.got and ("points", sec) in self.got, timeout)
        if not ok:
            return None
        return (self.got[("depth", sec)] - t0) * 1e3, (self.got[("points", sec)] - t0) * 1e3

    def close(self):
        self.ex.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.ctx)


def camera_info(size):
    h, w = size
    calib = load_kitti_calib(DATE_DIR, 2)
    K = calib.K.copy()
    W0, H0 = calib.image_size
    K[0] *= w / W0
    K[1] *= h / H0
    info = CameraInfo(width=w, height=h, distortion_model="plumb_bob", d=[0.0] * 5)
    info.k = [float(v) for v in K.ravel()]
    info.p = [float(v) for v in np.hstack([K, np.zeros((3, 1))]).ravel()]
    info.header.frame_id = "cam2_optical"
    return info


def run_size(size, frames, ckpt, net, extra, outputs, best_effort=False):
    rgb = cv2.imread(str(FRAME))[..., ::-1]
    rgb = np.ascontiguousarray(cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    # Reliable input unless the camera's best-effort delivery is what is measured.
    qos = [] if best_effort else ["-p", "input_qos:=reliable"]
    cmd = [str(pathlib.Path(sys.executable).parent / "depth_node"), "--ros-args",
           "--params-file", str(ROOT / "config/depth.yaml"), "-p", f"checkpoint:={ckpt}",
           "-p", f"input_height:={net[0]}", "-p", f"input_width:={net[1]}",
           "-p", "diagnostics_period:=0.5"] + qos + sum((["-p", e] for e in extra), [])
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    bench = Bench(outputs, best_effort)
    try:
        info = camera_info(size)
        lat, sec = [], 1
        end = time.time() + 60
        # Discovery: the node matches this process's publishers and its outputs our subscriptions.
        while not (bench.pub_img.get_subscription_count() and all(s.get_publisher_count() for s in bench.subs.values())):
            if time.time() > end or proc.poll() is not None:
                log.seek(0)
                raise RuntimeError("node not discovered:\n" + log.read())
            time.sleep(0.1)
        for _ in range(5):  # warm-up; the first answer also shows the node's outputs flow
            sec += 1
            if bench.send(array_to_image(rgb, "rgb8"), info, sec, timeout=5.0) is not None:
                break
        for _ in range(frames):
            sec += 1
            r = bench.send(array_to_image(rgb, "rgb8"), info, sec, timeout=5.0)
            if r is not None:
                lat.append(r)
        time.sleep(1.2)  # one more diagnostics period
        with bench.cv:
            diag = dict(bench.diag)
    finally:
        bench.close()
        proc.terminate()
        proc.wait(timeout=15)
    stages = {k: float(diag.get(f"{k} (ms)", "nan")) for k in STAGES}
    nan = float("nan")
    return {"depth_ms": statistics.median(d for d, _ in lat) if lat else nan,
            "points_ms": statistics.median(p for _, p in lat) if lat else nan,
            "answered": f"{len(lat)}/{frames}", **stages}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=15)
    ap.add_argument("--sizes", nargs="+", default=["192x640", "375x1242"])
    ap.add_argument("--net", default="192x640", help="network input HxW (lite preset)")
    ap.add_argument("--outputs", nargs="+", default=list(OUTPUTS), choices=OUTPUTS,
                    help="topics this process subscribes to (depth and points always)")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME:=VALUE", help="extra node parameters")
    ap.add_argument("--best-effort", action="store_true",
                    help="publish with sensor-data QoS to the node's default best-effort input")
    ap.add_argument("--large-data-profile", action="store_true",
                    help="node and this process use config/fastdds_large_data.xml (shared memory part)")
    args = ap.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
    net = tuple(int(v) for v in args.net.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        if args.large_data_profile:  # read when this process and the node create their participants
            os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(shm_only(PROFILE, pathlib.Path(tmp) / "profile.xml"))
        torch.manual_seed(0)
        cfg = get_preset("lite", height=net[0], width=net[1])
        ckpt = save_checkpoint(pathlib.Path(tmp) / "lite.pt",
                               {"model_config": cfg.to_dict(), "model": DiffSQLDepth(cfg).state_dict()})
        rows = [(s, run_size(tuple(int(v) for v in s.split("x")), args.frames, ckpt, net, args.set,
                             args.outputs, args.best_effort))
                for s in args.sizes]
    print(f"\ndepth node latency, lite preset, network {args.net}, {os.cpu_count()} CPUs, "
          f"torch threads {os.environ.get('OMP_NUM_THREADS')}, medians over {args.frames} frames (ms), "
          f"load {os.getloadavg()[0]:.2f}, publication mode "
          f"{os.environ.get('RMW_FASTRTPS_PUBLICATION_MODE', 'AUTO (node default)')}, subscribed: {' '.join(args.outputs)}, "
          f"input {'best effort' if args.best_effort else 'reliable'}, "
          f"large-data profile {'on' if args.large_data_profile else 'off'}")
    head = ["input", "answered", "e2e depth", "e2e points"] + list(STAGES) + ["overhead"]
    print(" | ".join(f"{h:>10}" for h in head))
    for s, r in rows:
        overhead = sum(r[k] for k in STAGES if k != "model")
        vals = [r["depth_ms"], r["points_ms"]] + [r[k] for k in STAGES] + [overhead]
        print(" | ".join([f"{s:>10}", f"{r['answered']:>10}"] + [f"{v:10.2f}" for v in vals]))


if __name__ == "__main__":
    main()
