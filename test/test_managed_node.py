"""The managed (lifecycle) depth node driven through its real lifecycle services from this process:
configure loads the model, activate creates the topics, deactivate stops inference and keeps
the model, cleanup frees it; a bad checkpoint makes configure fail with the reason logged."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402

from test_depth_node import NET, PARAMS_FILE, Receiver, _rss_mb, make_checkpoint, node_env, stop_gracefully  # noqa: E402
from test_multi_camera import CameraPublisher, MultiReceiver  # noqa: E402

CAM = "cam_a"  # the node serves one camera in its namespace: a publisher that waits for nothing else

MANAGED = pathlib.Path(sys.executable).parent / "managed_depth_node"


def start(tmp, ckpt, name="node"):
    log = open(tmp / f"{name}.log", "w")
    proc = subprocess.Popen(
        [str(MANAGED), "--ros-args", "--params-file", str(PARAMS_FILE), "-p", f"checkpoint:={ckpt}",
         "-p", f"input_height:={NET[0]}", "-p", f"input_width:={NET[1]}", "-p", "input_qos:=reliable",
         "-p", "diagnostics_period:=0.5", "-p", f"cameras:=[{CAM}]"],
        stdout=log, stderr=subprocess.STDOUT, env=node_env(), cwd=tmp)
    return proc, log


def state(rx) -> str:
    return rx.call(GetState, "/depth_node/get_state", GetState.Request()).current_state.label


def change(rx, transition: int) -> bool:
    req = ChangeState.Request(transition=Transition(id=transition))
    return rx.call(ChangeState, "/depth_node/change_state", req, timeout=60.0).success


def publishers(rx, topic=f"/{CAM}/depth") -> int:
    return len(rx.node.get_publishers_info_by_topic(topic))


def test_transitions_through_the_lifecycle_services(tmp_path):
    ckpt = make_checkpoint(tmp_path / "lite.pt")
    proc, log = start(tmp_path, ckpt)
    rx, pub = MultiReceiver(), CameraPublisher(tmp_path, CAM, 0)
    try:
        end = time.time() + 30
        while True:  # the lifecycle services come up with the node
            try:
                assert state(rx) == "unconfigured"
                break
            except AssertionError:
                assert time.time() < end and proc.poll() is None, (tmp_path / "node.log").read_text()
        assert publishers(rx) == 0 and "loaded" not in (tmp_path / "node.log").read_text()

        assert change(rx, Transition.TRANSITION_CONFIGURE) and state(rx) == "inactive"
        assert "loaded" in (tmp_path / "node.log").read_text()  # the model, before any topic
        time.sleep(0.5)
        assert publishers(rx) == 0

        assert change(rx, Transition.TRANSITION_ACTIVATE) and state(rx) == "active"
        pub.ready()
        msgs = rx.request(pub, "frame 500", 500, (f"/{CAM}/depth", f"/{CAM}/points"))
        assert np.isfinite(np.frombuffer(msgs[f"/{CAM}/depth"].data, np.float32)).any()

        rss_active = _rss_mb(proc.pid)
        assert change(rx, Transition.TRANSITION_DEACTIVATE) and state(rx) == "inactive"
        end = time.time() + 10
        while publishers(rx) and time.time() < end:  # graph updates are asynchronous
            time.sleep(0.1)
        assert publishers(rx) == 0
        assert pub.send("frame 501") == "ok"
        time.sleep(1.0)
        with rx.lock:
            assert all(m.header.stamp.sec != 501 for m in rx.msgs[f"/{CAM}/depth"])  # no inference while inactive
        assert _rss_mb(proc.pid) > 0.9 * rss_active  # frees nothing: the model stays loaded

        # Activate again: serves at once, without loading the model a second time.
        assert change(rx, Transition.TRANSITION_ACTIVATE)
        rx.request(pub, "frame 502", 502, (f"/{CAM}/depth",))
        assert (tmp_path / "node.log").read_text().count("loaded ") == 1

        assert change(rx, Transition.TRANSITION_DEACTIVATE)
        assert change(rx, Transition.TRANSITION_CLEANUP) and state(rx) == "unconfigured"
        # Cleaned up: configure loads again.
        assert change(rx, Transition.TRANSITION_CONFIGURE) and state(rx) == "inactive"
        assert (tmp_path / "node.log").read_text().count("loaded ") == 2
        assert change(rx, Transition.TRANSITION_INACTIVE_SHUTDOWN)
        assert state(rx) == "finalized"
    finally:
        pub.close()
        rx.close()
        stop_gracefully(proc)
        log.close()
    assert proc.returncode == 0
    assert "Traceback" not in (tmp_path / "node.log").read_text()


def test_configure_with_a_bad_checkpoint_fails_with_the_reason(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    proc, log = start(tmp_path, bad)
    rx = Receiver()
    try:
        end = time.time() + 30
        while True:
            try:
                assert state(rx) == "unconfigured"
                break
            except AssertionError:
                assert time.time() < end and proc.poll() is None
        assert not change(rx, Transition.TRANSITION_CONFIGURE)
        assert state(rx) == "unconfigured" and proc.poll() is None  # the node lives on
        text = (tmp_path / "node.log").read_text()
        assert "configure failed" in text and "corrupt.pt" in text, text[-2000:]
    finally:
        rx.close()
        stop_gracefully(proc)
        log.close()
