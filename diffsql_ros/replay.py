"""One bag replay through the real depth node: its settings, the node as a child process, the
rclpy side (player and evaluator nodes on their own executor) and the passes that publish.

`replay_session` owns the node process, the rclpy context and the executor: leaving its block
stops all three, whatever happened inside. diffsql-bag-eval (bag_eval.py) scores what comes back;
with `uncertainty`, an UncertaintyScorer (uncertainty_scorer.py) also pairs each frame's depth with its
depth/uncertainty in the main pass and scores the pair by sparsification.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator, Optional

from diffsql_model.data.bag_reader import decode_image
from diffsql_ros.bag_player import BagTopics, Player, ReplayFrame, schedule, stream_images
from diffsql_ros.dds_profile import PROFILE, shm_only
from diffsql_ros.uncertainty_scorer import UncertaintyScorer

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class ReplaySettings:
    """What one replay is asked to do (the diffsql-bag-eval command line, minus its outputs)."""

    bag: pathlib.Path
    checkpoint: pathlib.Path
    params_file: pathlib.Path
    image_topic: Optional[str] = None
    camera_info_topic: Optional[str] = None
    lidar_topic: Optional[str] = None
    extrinsic: Optional[str] = None
    lidar_tolerance: float = 0.05  # seconds between image and scan stamps
    rate: Optional[float] = None  # x the recorded timing; None: as fast as the node keeps up
    timeout: float = 20.0  # seconds to wait for one depth image
    first_timeout: float = 120.0  # ... for the first one (warm-up)
    startup_timeout: float = 120.0
    max_frames: int = 0  # 0: all
    scaling: str = "median"
    scale: float = 1.0
    sd_path: Optional[pathlib.Path] = None
    node_params: tuple[str, ...] = ()  # extra depth node parameters, NAME:=VALUE
    report: Optional[pathlib.Path] = None
    report_frames: int = 3
    uncertainty: bool = False  # also score depth/uncertainty (sparsification) in the main pass
    progress: str = ""  # label of a progress line on stderr; empty: none

    @classmethod
    def from_args(cls, args) -> "ReplaySettings":
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "node_params": tuple(values["node_params"])})


@contextlib.contextmanager
def local_dds_environment():
    """For one replay, in this process and the node's: DDS discovery on loopback, and the
    large-data profile's shared memory without UDP, since player, node and evaluator share this
    machine. It carries big frames and clouds whole and makes the node publish asynchronously
    (KITTI replay p90 latency 91-105 ms against 106-383 ms without, three runs each). What the
    user set wins; the environment is restored afterwards."""
    saved = {k: os.environ.get(k) for k in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "FASTDDS_DEFAULT_PROFILES_FILE")}
    tmp = tempfile.TemporaryDirectory(prefix="diffsql_dds_")  # one per replay: runs never share it
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if not os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(shm_only(PROFILE, pathlib.Path(tmp.name) / "profile.xml"))
    try:
        yield
    finally:
        tmp.cleanup()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ros_env() -> dict:
    """Environment of every ROS process started here: DDS stays on loopback unless told otherwise."""
    env = dict(os.environ)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    return env


class NodeProcess:
    """The depth node as a child process; its log goes to a file shown when it fails."""

    def __init__(self, namespace: str, checkpoint: pathlib.Path, params_file: pathlib.Path,
                 compressed: bool, extra_params=(), log_path: Optional[pathlib.Path] = None):
        if not params_file.is_file():
            raise FileNotFoundError(f"depth node parameters not found: {params_file}")
        self.cmd = [sys.executable, "-m", "diffsql_ros.depth_node", "--ros-args",
                    "-r", f"__ns:={namespace}", "--params-file", str(params_file),
                    "-p", f"checkpoint:={checkpoint}"]
        if compressed:
            self.cmd += ["-p", "image_transport:=compressed"]
        if not any(p.startswith("input_qos:=") for p in extra_params):
            # Best-effort (sensor_data) subscriptions lose big images across processes on a default
            # Fast DDS set-up (1242x375 rgb8: none of them arrives): a replay must not lose frames
            # in transport, so it subscribes reliably unless --node-param input_qos:=... says else.
            self.cmd += ["-p", "input_qos:=reliable"]
        if not any(p.startswith("points.rgb:=") for p in extra_params):
            self.cmd += ["-p", "points.rgb:=true"]  # the report draws the cloud in the camera's colours
        for p in extra_params:
            self.cmd += ["-p", p]
        self.log_path = log_path or pathlib.Path(tempfile.mkstemp(prefix="depth_node_", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=ros_env(),
                                     cwd=str(ROOT))

    @classmethod
    def for_replay(cls, settings: ReplaySettings, namespace: str, compressed: bool) -> "NodeProcess":
        """The node a replay runs: its log in the report folder, when there is one."""
        log_path = (settings.report / "depth_node.log") if settings.report else None
        if log_path:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        params = list(settings.node_params) + ([f"sd_path:={settings.sd_path}"] if settings.sd_path else [])
        return cls(namespace, settings.checkpoint, settings.params_file, compressed, params, log_path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@dataclasses.dataclass
class ReplaySession:
    """A running replay: the node process, the player and the evaluator node (DepthEvaluator);
    with --uncertainty, the UncertaintyScorer of the main pass."""

    node: NodeProcess
    player: Player
    evaluator: object
    startup_s: float = 0.0  # executor start -> the node subscribed and publishing
    uncertainty: Optional[UncertaintyScorer] = None

    def require_alive(self, when: str) -> None:
        if not self.node.alive():
            raise RuntimeError(f"the depth node exited {when}\n--- depth node log ---\n{self.node.log_tail()}")

    def wait_until_up(self, timeout_s: float) -> None:
        start = time.monotonic()
        try:
            self.evaluator.connect(timeout_s, self.node.alive)
            if not self.player.wait_for_subscribers(timeout_s, self.node.alive):
                raise TimeoutError("the depth node did not subscribe to the image topic")
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"depth node did not start: {e}\n"
                               f"--- depth node log ---\n{self.node.log_tail()}") from None
        self.startup_s = time.monotonic() - start


@contextlib.contextmanager
def replay_session(settings: ReplaySettings, image_type: str, ground_truth, cfg) -> Iterator[ReplaySession]:
    """The depth node started, an rclpy context with the player and a DepthEvaluator(ground_truth,
    cfg) spun by a 2-thread executor, all connected. Leaving the block shuts the executor down,
    stops the node (SIGINT, then kill) and shuts the context down, whatever happened."""
    # ROS 2 (rclpy, message packages) only here: the settings and helpers above import without it
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from diffsql_ros.evaluator_node import DepthEvaluator

    ns = f"/diffsql_bag_eval_{os.getpid()}"
    compressed = image_type.endswith("CompressedImage")
    node = NodeProcess.for_replay(settings, ns, compressed)
    context = rclpy.Context()
    rclpy.init(context=context)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    evaluator = None
    try:
        player_node = Node("diffsql_bag_player", context=context)
        image_topic = f"{ns}/image/compressed" if compressed else f"{ns}/image"
        player = Player(player_node, image_topic, f"{ns}/camera_info", image_type)
        evaluator = DepthEvaluator(ns, ground_truth, cfg, context=context)
        executor.add_node(player_node)
        executor.add_node(evaluator)
        threading.Thread(target=executor.spin, daemon=True).start()
        session = ReplaySession(node, player, evaluator)
        session.wait_until_up(settings.startup_timeout)
        if settings.uncertainty:
            session.uncertainty = UncertaintyScorer(ground_truth, cfg)
            session.uncertainty.subscribe(evaluator, Image, settings.startup_timeout)
        yield session
    finally:
        executor.shutdown(timeout_sec=2.0)
        node.stop()
        if evaluator is not None:
            evaluator.destroy_node()
        rclpy.try_shutdown(context=context)


def play(frames: list[ReplayFrame], session: ReplaySession, settings: ReplaySettings, topics: BagTopics,
         keep=frozenset()) -> tuple[list[ReplayFrame], dict]:
    """Main pass: images streamed from the bag and published. Returns (frames published, all of
    them unless the node died; {stamp: frame with its image} for the stamps in `keep`)."""
    player, evaluator, alive = session.player, session.evaluator, session.node.alive
    played, kept = [], {}
    t0 = None
    stream = stream_images(settings.bag, topics, frames)
    for i, ((frame, at), loaded) in enumerate(zip(schedule(frames, settings.rate), stream)):
        if not alive():
            break
        t0 = time.monotonic() if t0 is None else t0  # the clock starts at the first publish
        wait = t0 + at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        player.publish(loaded)
        played.append(frame)
        if frame.stamp_ns in keep:
            kept[frame.stamp_ns] = loaded
        if settings.rate is None:  # backpressure: the next frame only when this one's depth is out
            evaluator.wait_for(frame.stamp_ns, settings.first_timeout if i == 0 else settings.timeout, alive)
        if settings.progress:
            print(f"\r{settings.progress}: frame {i + 1}/{len(frames)}", end="", file=sys.stderr, flush=True)
    stream.close()
    if settings.progress:
        print(file=sys.stderr)
    # --rate: the node drops frames it cannot keep up with; those never come, so stop waiting
    # once it has been idle for twice the slowest latency seen (at least 3 s).
    lat = [evaluator.received[f.stamp_ns] - player.publish_time(f.stamp_ns)
           for f in played if f.stamp_ns in evaluator.received]
    evaluator.wait_quiet({f.stamp_ns for f in played}, settings.timeout if settings.rate is not None else 0.5,
                         alive, idle_s=max(3.0, 2 * max(lat, default=0.0)))
    return played, kept


def replay_samples(samples: list[ReplayFrame], session: ReplaySession, settings: ReplaySettings) -> list:
    """Replay the sample frames with uncertainty and points subscribed; keep their outputs."""
    session.evaluator.watch_samples([f.stamp_ns for f in samples], settings.startup_timeout)
    out = []
    for frame in samples:
        if not session.node.alive():
            break
        session.player.publish(frame)
        session.evaluator.wait_for_sample(frame.stamp_ns, settings.timeout, session.node.alive)
        rgb = decode_image(frame.image, frame.image_type)  # the node's decoders, on the bag message
        out.append({"stamp_ns": frame.stamp_ns, "index": frame.index, "rgb": rgb,
                    "sample": session.evaluator.samples.get(frame.stamp_ns)})
    return out
