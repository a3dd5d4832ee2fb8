"""launch/depth.launch.py run for real: `ros2 launch diffsql_ros depth.launch.py ...` through the
real LaunchService on a colcon-shaped prefix (launch_prefix.py), checked from this process.

Each LaunchCase is one launch of the file with its launch arguments and the cameras the graph
must then serve. A new launch option is a new case in CASES: its launch arguments, the processes
launch must start and the nodes and topics the graph must show, e.g. (with the argument names
that option defines)
    LaunchCase("managed", {**REMAPPED, "managed": "true", "autostart": "true"}, (CAM0,),
               executables=("managed_depth_node",))
Every test below then runs on it too; checks of its own (lifecycle states...) go in a test that
takes `launched` and skips the cases it is not about.
"""
from __future__ import annotations

import dataclasses
import os
import time

import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

import cv2  # noqa: E402
import yaml  # noqa: E402
from builtin_interfaces.msg import Time  # noqa: E402
from lifecycle_msgs.srv import GetState  # noqa: E402
from rcl_interfaces.srv import GetParameters  # noqa: E402
from rclpy.node import NodeNameNonExistentError  # noqa: E402
from rclpy.parameter import parameter_value_to_python  # noqa: E402
from rclpy.qos import QoSProfile  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402

from diffsql_model.data.calib import load_kitti_calib  # noqa: E402
from launch_prefix import LaunchProcess, build_prefix  # noqa: E402
from test_depth_node import DATE_DIR, FRAME_ID, FRAMES, NET, Receiver, _camera_info, _image, make_checkpoint  # noqa: E402

# The params file every case is launched with: values a default launch would not give.
PARAMS = {"checkpoint": "/not/this/one.pt",  # the launch argument's must win
          "input_height": NET[0], "input_width": NET[1], "device": "cpu",
          "input_qos": "reliable",  # 1.4 MB frames: best effort loses fragments on a loaded box
          "diagnostics_period": 0.5, "points": {"decimation": 3}}
SIGTERM_TIMEOUT = 5.0  # launch's default sigterm_timeout: Ctrl-C must be done before it


@dataclasses.dataclass(frozen=True)
class Camera:
    """One camera the launched graph serves: which node takes which topics, where depth comes out."""
    node: str  # fully qualified node name
    image: str
    camera_info: str
    outputs: str  # namespace of its depth / points

    def output(self, name):
        """Topic key of an output: Receiver's own relative names for a camera in "/"."""
        return f"{self.outputs.rstrip('/')}/{name}" if self.outputs != "/" else name


@dataclasses.dataclass(frozen=True)
class LaunchCase:
    id: str
    launch_args: dict  # checkpoint and params_file are added to every case
    cameras: tuple  # of Camera
    executables: tuple = ("depth_node",)  # the processes launch must start, one each


REMAPPED = {"image": "/cam0/image_raw", "camera_info": "/cam0/camera_info"}
CAM0 = Camera("/depth_node", "/cam0/image_raw", "/cam0/camera_info", "/")
CASES = [
    LaunchCase("remapped", REMAPPED, (CAM0,)),
    # The lifecycle node, configured and activated by launch (autostart).
    LaunchCase("managed", {**REMAPPED, "managed": "true", "autostart": "true"}, (CAM0,),
               executables=("managed_depth_node",)),
    # Two cameras, one node: each camera's <ns>/image_raw and <ns>/camera_info in, <ns>/depth out.
    LaunchCase("cameras", {"cameras": "front,left"},
               (Camera("/depth_node", "/front/image_raw", "/front/camera_info", "/front"),
                Camera("/depth_node", "/left/image_raw", "/left/camera_info", "/left"))),
]


class Probe(Receiver):
    """The test's rclpy node: the node outputs (Receiver), plus camera publishers and the graph."""

    def __init__(self, cameras):
        super().__init__()
        self.cams = {}
        for cam in cameras:
            for topic, typ in {cam.output("depth"): Image, cam.output("points"): PointCloud2}.items():
                if topic not in self.msgs:  # a camera in "/": Receiver listens there already
                    self.msgs[topic], self.arrival[topic] = [], []
                    self.node.create_subscription(typ, topic, lambda m, t=topic: self._store(t, m),
                                                  QoSProfile(depth=10))
            self.cams[cam] = (self.node.create_publisher(Image, cam.image, QoSProfile(depth=5)),
                              self.node.create_publisher(CameraInfo, cam.camera_info, QoSProfile(depth=5)))

    def subscriptions(self, fqn):
        """{topic: types} the node `fqn` subscribes; {} while the graph does not show it."""
        ns, name = fqn.rsplit("/", 1)
        if (name, ns or "/") not in self.node.get_node_names_and_namespaces():
            return {}
        try:
            return dict(self.node.get_subscriber_names_and_types_by_node(name, ns or "/"))
        except NodeNameNonExistentError:  # left the graph in between
            return {}

    def subscriptions_of(self, fqn, expect, timeout=20.0):
        """subscriptions(fqn), once the graph shows every topic of `expect` (or after `timeout`)."""
        end = time.time() + timeout
        while True:
            subs = self.subscriptions(fqn)
            if set(expect) <= set(subs) or time.time() > end:
                return subs
            time.sleep(0.2)

    def send_frame(self, cam, calib, rgb, sec, tries=5):
        """camera_info + image stamped `sec` on the camera's topics, until its depth and points come."""
        pub_img, pub_info = self.cams[cam]
        end = time.time() + 20
        while min(pub_img.get_subscription_count(), pub_info.get_subscription_count()) == 0:
            assert time.time() < end, f"nobody subscribes {cam.image} / {cam.camera_info}"
            time.sleep(0.1)
        for attempt in range(tries):
            stamp = Time(sec=sec)
            pub_info.publish(_camera_info(calib, stamp))
            pub_img.publish(_image(rgb, stamp))
            try:
                return {t: self.wait_for(cam.output(t), sec, timeout=5.0) for t in ("depth", "points")}
            except AssertionError:
                if attempt == tries - 1:
                    raise

    def get_params(self, fqn, names):
        res = self.call(GetParameters, f"{fqn}/get_parameters", GetParameters.Request(names=names))
        return {n: parameter_value_to_python(v) for n, v in zip(names, res.values)}


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return build_prefix(tmp_path_factory.mktemp("install"))


def test_prefix_holds_what_colcon_installs(prefix):
    """setup.py's data_files and setup.cfg's script dir give the layout launch and ros2 look up."""
    share = prefix / "share" / "diffsql_ros"
    for rel in ("package.xml", "launch/depth.launch.py", "config/depth.yaml", "config/depth.rviz",
                "config/fastdds_large_data.xml"):
        assert (share / rel).is_file(), rel
    assert (prefix / "share/ament_index/resource_index/packages/diffsql_ros").is_file()
    exe = prefix / "lib" / "diffsql_ros" / "depth_node"
    assert os.access(exe, os.X_OK) and "from diffsql_ros.depth_node import main" in exe.read_text()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "lite.pt")


def launch(prefix, tmp, launch_args, cameras):
    """`ros2 launch diffsql_ros depth.launch.py <launch_args>` and the test's node on its graph."""
    proc = LaunchProcess(prefix, tmp / "launch.log", "depth.launch.py", launch_args)
    try:
        probe = Probe(cameras)
    except BaseException:
        proc.kill()
        raise
    return proc, probe


def wait_up(launched, timeout=90.0):
    """Until every node of the case is in the graph with its subscriptions made (constructed,
    model loaded: the node imports torch first), failing at once when a launched process dies."""
    case, proc, probe = launched
    end = time.time() + timeout
    while not all(probe.subscriptions(cam.node) for cam in case.cameras):
        proc.assert_running()
        assert time.time() < end, f"{[c.node for c in case.cameras]} not up within {timeout} s:\n{proc.text()[-3000:]}"
        time.sleep(0.2)
    proc.assert_running()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def launched(request, prefix, checkpoint, tmp_path_factory):
    case = request.param
    tmp = tmp_path_factory.mktemp(f"launch_{case.id}")
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": PARAMS}}))
    args = {"checkpoint": str(checkpoint), "params_file": str(params_file), **case.launch_args}
    proc, probe = launch(prefix, tmp, args, case.cameras)
    try:
        yield dataclasses.replace(case, launch_args=args), proc, probe
    finally:
        probe.close()
        if proc.proc.poll() is None:  # a test failed before the Ctrl-C test
            proc.kill()


def test_node_is_up(launched):
    case, proc, probe = launched
    wait_up(launched)
    started = proc.process_pids()  # launch names a process <executable>-<n>
    assert sorted(n.rsplit("-", 1)[0] for n in started) == sorted(case.executables), proc.text()
    assert "rviz2" not in proc.text()  # rviz:=false by default


def test_remaps_apply(launched):
    case, proc, probe = launched
    calib = load_kitti_calib(DATE_DIR, 2)
    W, H = calib.image_size
    rgb = cv2.imread(str(FRAMES[0]))[..., ::-1].copy()
    wait_up(launched)
    for i, cam in enumerate(case.cameras):
        expect = {cam.image: ["sensor_msgs/msg/Image"], cam.camera_info: ["sensor_msgs/msg/CameraInfo"]}
        subs = probe.subscriptions_of(cam.node, expect)
        assert {t: subs.get(t) for t in expect} == expect, subs
        assert not {"/image", "/camera_info", "/camera/image_raw", "/camera/camera_info"} & set(subs), subs
        # A real frame on the remapped topics comes back as depth (and a cloud) with its stamp.
        msgs = probe.send_frame(cam, calib, rgb, sec=500 + i)
        depth, cloud = msgs["depth"], msgs["points"]
        assert (depth.width, depth.height, depth.encoding, depth.header.frame_id) == (W, H, "32FC1", FRAME_ID)
        # points.decimation: 3 from the params file (the default is 4), in effect.
        assert (cloud.width, cloud.height) == (-(-W // 3), -(-H // 3))


def test_params_file_and_checkpoint_arrive(launched):
    case, proc, probe = launched
    flat = {"input_height": NET[0], "input_width": NET[1], "device": "cpu", "input_qos": "reliable",
            "diagnostics_period": 0.5, "points.decimation": 3,
            "checkpoint": case.launch_args["checkpoint"],  # the launch argument, not the params file's
            "image_transport": "raw", "points.rgb": False}  # not in the file: the declared defaults
    wait_up(launched)
    for cam in case.cameras:
        assert probe.get_params(cam.node, list(flat)) == flat


def test_managed_node_autostarts_to_active(launched):
    case, proc, probe = launched
    if case.launch_args.get("managed") != "true":
        pytest.skip("the lifecycle node's case only")
    wait_up(launched)
    res = probe.call(GetState, "/depth_node/get_state", GetState.Request())
    assert res.current_state.label == "active"
    assert "configure failed" not in proc.text()


def test_ctrl_c_stops_the_node_before_launch_escalates(launched):
    case, proc, probe = launched
    wait_up(launched)
    pids = proc.process_pids()
    t0 = time.time()
    assert proc.ctrl_c(timeout=SIGTERM_TIMEOUT + 20) == 0, proc.text()[-3000:]
    took = time.time() - t0
    log = proc.text()
    assert "escalating to 'SIGTERM'" not in log and "sending signal 'SIGTERM'" not in log, \
        f"a process took over {SIGTERM_TIMEOUT} s to exit after Ctrl-C:\n{log[-3000:]}"
    for name, pid in pids.items():
        assert f"[INFO] [{name}]: process has finished cleanly [pid {pid}]" in log, log[-3000:]  # exit code 0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "Traceback" not in log, log[-3000:]
    assert took < SIGTERM_TIMEOUT, took
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.proc.pid, 0)  # the whole group is gone
