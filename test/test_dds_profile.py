"""config/fastdds_large_data.xml for real: with the profile (its shared-memory part,
diffsql_ros.dds_profile.shm_only) in the camera and the node, a best-effort stream of 640x480
rgb8 frames (921 KB, more than Fast DDS's default 512 KB shared-memory segment, so they travel
whole instead of in 64 KB fragments) reaches the node on its default sensor-data subscription.

This checks that Fast DDS loads the shipped profile (each process makes a 16 MiB segment) and
carries such frames; it does not show the
loss the profile prevents, which depends on timing and load: a free-running 4 Hz camera like this
one got through without the profile too, while bench/node_latency.py --best-effort (one frame at
a time, outputs received by the camera's process) got 0-3 of 8 frames answered without it and 8
of 8 with it.

Run as a script (`python test_dds_profile.py publish`) this file is the camera process.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

if __name__ != "__main__":
    pytest.importorskip("rclpy")
SIZE = (480, 640)  # height, width


def _camera_main(images=True):
    import cv2
    import rclpy
    from builtin_interfaces.msg import Time
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, Image

    from diffsql_model.data.calib import load_kitti_calib
    from test_depth_node import DATE_DIR, FRAMES, _camera_info, _image

    rclpy.init()
    node = rclpy.create_node("best_effort_camera")
    pub_img = node.create_publisher(Image, "image", qos_profile_sensor_data)
    pub_info = node.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data)
    rgb = cv2.resize(cv2.imread(str(FRAMES[0]))[..., ::-1].copy(), SIZE[::-1], interpolation=cv2.INTER_AREA)
    calib = load_kitti_calib(DATE_DIR, 2)
    sec = 0
    while rclpy.ok():  # 4 frames a second, as a camera: it never waits for anyone
        sec += 1
        stamp = Time(sec=sec)
        info = _camera_info(calib, stamp)
        sx, sy = SIZE[1] / info.width, SIZE[0] / info.height
        info.width, info.height = SIZE[1], SIZE[0]
        info.k = [info.k[0] * sx, 0.0, info.k[2] * sx, 0.0, info.k[4] * sy, info.k[5] * sy, 0.0, 0.0, 1.0]
        info.p = [info.k[0], 0.0, info.k[2], 0.0, 0.0, info.k[4], info.k[5], 0.0, 0.0, 0.0, 1.0, 0.0]
        pub_info.publish(info)
        if images:  # without: the symptom of frames lost in transport, camera_info alone arriving
            pub_img.publish(_image(rgb, stamp))
        time.sleep(0.25)


def test_shm_only_keeps_the_shared_memory_transport_and_drops_udp(tmp_path):
    import xml.etree.ElementTree as ET

    from diffsql_ros.dds_profile import PROFILE, shm_only

    ns = {"d": "http://www.eprosima.com"}
    full = ET.parse(PROFILE)
    assert {d.findtext("d:type", namespaces=ns) for d in full.iterfind(".//d:transport_descriptor", ns)} == {"SHM", "UDPv4"}
    tree = ET.parse(shm_only(PROFILE, tmp_path / "p.xml"))
    (desc,) = tree.iterfind(".//d:transport_descriptor", ns)
    assert desc.findtext("d:type", namespaces=ns) == "SHM"
    segment, message = (int(desc.findtext(f"d:{k}", namespaces=ns)) for k in ("segment_size", "maxMessageSize"))
    assert segment >= 4 * message and message >= 1242 * 375 * 3  # several whole KITTI frames
    refs = [t.text for t in tree.iterfind(".//d:userTransports/d:transport_id", ns)]
    assert refs == [desc.findtext("d:transport_id", namespaces=ns)]
    assert tree.findtext(".//d:useBuiltinTransports", namespaces=ns) == "false"
    # Both copies make writers asynchronous for processes in AUTO publication mode (depth_node).
    for t in (full, tree):
        (writer,) = [w for w in t.iterfind(".//d:data_writer", ns) if w.get("is_default_profile") == "true"]
        assert writer.findtext("d:qos/d:publishMode/d:kind", namespaces=ns) == "ASYNCHRONOUS"


def _shm_segments() -> dict:
    """Fast DDS shared-memory segment files -> size in bytes."""
    return {p.name: p.stat().st_size for p in pathlib.Path("/dev/shm").glob("fastdds_*") if p.is_file()}


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="Fast DDS segments live in /dev/shm on Linux")
def test_best_effort_frames_bigger_than_the_default_segment_reach_the_node(tmp_path):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile
    from sensor_msgs.msg import Image

    from diffsql_ros.dds_profile import PROFILE, shm_only
    from test_depth_node import CONSOLE_SCRIPT, NET, PARAMS_FILE, ROOT, make_checkpoint, node_env, stop_gracefully

    env = dict(node_env(), FASTDDS_DEFAULT_PROFILES_FILE=str(shm_only(PROFILE, tmp_path / "profile.xml")))
    ckpt = make_checkpoint(tmp_path / "lite.pt")
    before = _shm_segments()
    log = open(tmp_path / "node.log", "w")
    node = subprocess.Popen(  # input_qos stays the default: sensor_data (best effort)
        [str(CONSOLE_SCRIPT), "--ros-args", "--params-file", str(PARAMS_FILE), "-p", f"checkpoint:={ckpt}",
         "-p", f"input_height:={NET[0]}", "-p", f"input_width:={NET[1]}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    camera = subprocess.Popen([sys.executable, __file__, "publish"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "camera.log", "w"))
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    got, lock = {}, threading.Lock()
    try:
        rx = rclpy.create_node("profile_test_receiver", context=ctx)

        def on_depth(msg):
            with lock:
                got[msg.header.stamp.sec] = (msg.width, msg.height, msg.encoding)
        rx.create_subscription(Image, "depth", on_depth, QoSProfile(depth=10))
        executor = SingleThreadedExecutor(context=ctx)
        executor.add_node(rx)
        threading.Thread(target=executor.spin, daemon=True).start()
        end = time.time() + 60
        while time.time() < end and len(got) < 6:
            assert node.poll() is None and camera.poll() is None, (tmp_path / "node.log").read_text()
            time.sleep(0.2)
        with lock:
            answered = dict(got)
        # Fast DDS read the profile: the camera's and the node's participants each made a
        # 16 MiB shared-memory segment (the default ones are 512 KB).
        big = {name for name, size in _shm_segments().items() if name not in before and size >= 16 * 2**20}
        assert len(big) >= 2, _shm_segments()
        assert len(answered) >= 6, f"only {len(answered)} frames answered:\n{(tmp_path / 'node.log').read_text()}"
        assert set(answered.values()) == {(SIZE[1], SIZE[0], "32FC1")}
        # A stream, not a lucky frame: the node answers consecutive camera frames.
        stamps = sorted(answered)
        assert stamps[-1] - stamps[0] < 3 * len(stamps)
        executor.shutdown()
    finally:
        rclpy.try_shutdown(context=ctx)
        stop_gracefully(camera, node)  # a clean exit removes the 16 MiB segments
        log.close()


def test_node_diagnoses_a_camera_whose_images_do_not_arrive(tmp_path):
    """camera_info arriving without images is what lost big frames look like: the node says so
    on /diagnostics and in its log, and points at the profile."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from rclpy.executors import SingleThreadedExecutor

    from test_depth_node import CONSOLE_SCRIPT, NET, PARAMS_FILE, ROOT, make_checkpoint, node_env, stop_gracefully

    ckpt = make_checkpoint(tmp_path / "lite.pt")
    log = open(tmp_path / "node.log", "w")
    node = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "--ros-args", "--params-file", str(PARAMS_FILE), "-p", f"checkpoint:={ckpt}",
         "-p", f"input_height:={NET[0]}", "-p", f"input_width:={NET[1]}", "-p", "diagnostics_period:=0.5"],
        stdout=log, stderr=subprocess.STDOUT, env=node_env(), cwd=tmp_path)
    camera = subprocess.Popen([sys.executable, __file__, "publish", "info-only"], env=node_env(), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "camera.log", "w"))
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    seen, lock = [], threading.Lock()
    try:
        rx = rclpy.create_node("diag_test_receiver", context=ctx)

        def on_diag(msg):
            with lock:
                seen.extend((s.level, s.message) for s in msg.status if s.name.startswith("/depth_node:"))
        rx.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
        executor = SingleThreadedExecutor(context=ctx)
        executor.add_node(rx)
        threading.Thread(target=executor.spin, daemon=True).start()
        end, hit = time.time() + 40, None
        while time.time() < end and hit is None:
            assert node.poll() is None and camera.poll() is None, (tmp_path / "node.log").read_text()
            with lock:
                hit = next((m for lvl, m in seen if m.startswith("camera_info arrives but no image")), None)
                level = next((lvl for lvl, m in seen if m == hit), None)
            time.sleep(0.2)
        assert hit is not None, seen[-5:]
        assert level == DiagnosticStatus.WARN
        with lock:  # before the camera had been silent for 5 s the node only said it had no images yet
            before = {m for _, m in seen[: [m for _, m in seen].index(hit)]}
        assert before <= {"no images received"}, before
        time.sleep(1.0)
        assert "fastdds_large_data.xml" in (tmp_path / "node.log").read_text()
        executor.shutdown()
    finally:
        rclpy.try_shutdown(context=ctx)
        stop_gracefully(camera, node)
        log.close()


if __name__ == "__main__" and sys.argv[1:2] == ["publish"]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _camera_main(images=sys.argv[2:] != ["info-only"])
