"""One depth node, three cameras: each camera's frames come from its own publisher process (its own
namespace, frame_id, K and image); each camera's outputs must carry that camera's header, K and
depth, and frames that arrive together run through the model as one batch.

Run as a script (`python test_multi_camera.py publish <namespace> <index>`) this file is one
camera's publisher process, driven by one-line commands on stdin.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_depth_node import DATE_DIR, FRAMES, ROOT, _camera_info, _image  # noqa: E402

CAMERAS = ("cam_a", "cam_b", "cam_c")


def camera_K(calib, index: int) -> np.ndarray:
    """Each camera its own intrinsics: focal lengths scaled by 1 + 0.1 index."""
    K = calib.K.astype(np.float64).copy()
    K[0, 0] *= 1 + 0.1 * index
    K[1, 1] *= 1 + 0.1 * index
    return K


def _publisher_main(ns: str, index: int):
    import cv2
    import rclpy
    from builtin_interfaces.msg import Time
    from rclpy.qos import QoSProfile
    from sensor_msgs.msg import CameraInfo, Image

    from diffsql_model.data.calib import load_kitti_calib

    rclpy.init()
    node = rclpy.create_node(f"publisher_{ns}")
    pub_img = node.create_publisher(Image, f"/{ns}/image", QoSProfile(depth=5))
    pub_info = node.create_publisher(CameraInfo, f"/{ns}/camera_info", QoSProfile(depth=5))
    calib = load_kitti_calib(DATE_DIR, 2)
    K = camera_K(calib, index)
    rgb = cv2.imread(str(FRAMES[index]))[..., ::-1].copy()
    while min(p.get_subscription_count() for p in (pub_img, pub_info)) == 0:
        rclpy.spin_once(node, timeout_sec=0.05)
    print("ready", flush=True)

    def send(stamp):
        info = _camera_info(calib, stamp)
        info.header.frame_id = f"{ns}_optical"
        info.k = [float(v) for v in K.ravel()]
        P = np.array(info.p).reshape(3, 4)
        P[:, :3] = K
        info.p = [float(v) for v in P.ravel()]
        img = _image(rgb, stamp)
        img.header.frame_id = f"{ns}_optical"
        pub_info.publish(info)
        pub_img.publish(img)

    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "frame":  # frame <sec>
            send(Time(sec=int(args[0])))
            print("ok", flush=True)
        elif cmd == "stream":  # stream <seconds> <first sec>: 20 Hz, stamps first sec + 1 ns * i
            end, i = time.time() + float(args[0]), 0
            while time.time() < end:
                send(Time(sec=int(args[1]), nanosec=i))
                i += 1
                time.sleep(0.05)
            print(f"ok {i}", flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__" and sys.argv[1:2] == ["publish"]:
    _publisher_main(sys.argv[2], int(sys.argv[3]))
    sys.exit(0)

# ------------------------------------------------------------------ tests ------------------
rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

import cv2  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402

from diffsql_model.checkpoint import load_model  # noqa: E402
from diffsql_model.data.calib import load_kitti_calib  # noqa: E402
from diffsql_model.inference import DepthEstimator  # noqa: E402
from test_depth_node import (CONSOLE_SCRIPT, NET, PARAMS_FILE, Publisher, Receiver,  # noqa: E402
                             make_checkpoint, node_env, stop_gracefully)


class CameraPublisher(Publisher):
    def __init__(self, log_dir, ns: str, index: int):
        self.proc = subprocess.Popen([sys.executable, __file__, "publish", ns, str(index)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log_dir / f"publisher_{ns}.log", "w"),
                                     text=True, env=node_env(), cwd=ROOT)


class MultiReceiver(Receiver):
    """Every camera's depth, depth/camera_info and points, and the node's per-camera diagnostics."""

    def __init__(self):
        types = {"depth": Image, "depth/camera_info": CameraInfo, "points": PointCloud2}
        super().__init__({f"/{c}/{t}": typ for c in CAMERAS for t, typ in types.items()}, "multi_camera_receiver")

    def _diag(self, msg):
        with self.lock:
            self.diagnostics.append({s.name: {kv.key: kv.value for kv in s.values} for s in msg.status})


@pytest.fixture(scope="module")
def cams(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi_camera")
    ckpt = make_checkpoint(tmp / "lite.pt")
    log = open(tmp / "node.log", "w")
    node = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "--ros-args", "--params-file", str(PARAMS_FILE),
         "-p", f"checkpoint:={ckpt}", "-p", f"input_height:={NET[0]}", "-p", f"input_width:={NET[1]}",
         "-p", f"cameras:=[{','.join(CAMERAS)}]", "-p", "diagnostics_period:=0.5", "-p", "input_qos:=reliable"],
        stdout=log, stderr=subprocess.STDOUT, env=node_env(), cwd=tmp)
    rx = MultiReceiver()
    pubs = [CameraPublisher(tmp, c, i) for i, c in enumerate(CAMERAS)]
    try:
        for p in pubs:
            p.ready()
        end = time.time() + 40
        while True:  # discovery is asynchronous: until every camera's depth arrives
            assert node.poll() is None, (tmp / "node.log").read_text()
            assert time.time() < end, "outputs never reached the receiver"
            for p in pubs:
                assert p.send("frame 99") == "ok"
            try:
                for c in CAMERAS:
                    for t in ("depth", "points"):
                        rx.wait_for(f"/{c}/{t}", 99, timeout=2.0)
                break
            except AssertionError:
                continue
        yield {"node": node, "rx": rx, "pubs": pubs, "ckpt": ckpt, "log": tmp / "node.log"}
    finally:
        for p in pubs:
            p.close()
        rx.close()
        stop_gracefully(node)
        log.close()


def test_each_camera_gets_its_own_header_K_and_depth(cams):
    rx, pubs = cams["rx"], cams["pubs"]
    calib = load_kitti_calib(DATE_DIR, 2)
    W, H = calib.image_size
    model, cfg = load_model(cams["ckpt"], "cpu")
    est = DepthEstimator(model, cfg, "cpu", input_size=NET)
    depths = {}
    for i, (c, p) in enumerate(zip(CAMERAS, pubs)):
        msgs = rx.request(p, f"frame {200 + i}", 200 + i, (f"/{c}/depth", f"/{c}/depth/camera_info", f"/{c}/points"))
        for t, m in msgs.items():
            assert m.header.frame_id == f"{c}_optical" and m.header.stamp.sec == 200 + i, t
        info = msgs[f"/{c}/depth/camera_info"]
        assert (info.width, info.height) == (W, H)
        np.testing.assert_allclose(np.array(info.k).reshape(3, 3), camera_K(calib, i))
        depth = np.frombuffer(msgs[f"/{c}/depth"].data, np.float32).reshape(H, W)
        # Each camera's depth is the model's on that camera's own image (never a neighbour's).
        ref, _ = est.predict(cv2.imread(str(FRAMES[i]))[..., ::-1].copy())
        np.testing.assert_allclose(depth, ref, rtol=1e-3, atol=1e-3)
        depths[c] = depth
    assert not np.allclose(depths["cam_a"], depths["cam_b"], rtol=1e-2)  # the images differ


def test_streams_together_are_batched_with_per_camera_counters(cams):
    rx, pubs = cams["rx"], cams["pubs"]
    for p in pubs:  # all three cameras at 20 Hz at once, in parallel
        p.proc.stdin.write("stream 3 1000000\n")
        p.proc.stdin.flush()
    sent = [int(p.proc.stdout.readline().split()[1]) for p in pubs]
    time.sleep(1.5)
    with rx.lock:
        diag = rx.diagnostics[-1]
        got = {c: sum(1 for s, ns, t in rx.arrival[f"/{c}/depth"] if s == 1000000) for c in CAMERAS}
    names = {f"/depth_node: depth inference ({c})" for c in CAMERAS}
    assert set(diag) == names, diag.keys()
    for c, n in zip(CAMERAS, sent):
        d = diag[f"/depth_node: depth inference ({c})"]
        # Every camera is served while all three stream (a loaded CI box answered 2 of one camera).
        assert int(d["received frames"]) >= n and got[c] >= 1, (c, n, got, d)
        # The newest-frame policy per camera: what was neither processed nor dropped was never received.
        assert int(d["processed frames"]) + int(d["dropped frames"]) <= int(d["received frames"])
    # One model call serves the cameras whose frames wait together.
    assert float(diag["/depth_node: depth inference (cam_a)"]["batch size (mean)"]) > 1.5, diag
