"""`diffsql-bag-eval`: replay a bag through the real depth node and score it against the LiDAR.

  diffsql-bag-eval drive.bag --checkpoint model.pt --max-rate --json out.json --report out/

The bag's camera topics are published with their recorded headers; the depth node runs as its
own process (`python -m diffsql_ros.depth_node` with config/depth.yaml and the checkpoint
override, as on a robot); an in-process evaluator node pairs each depth image with the bag's
nearest LiDAR scan and scores it with the protocol code of `diffsql-eval --protocol bag`.

Timing: `--rate R` publishes at R x the recorded timing (the node drops what it cannot keep
up with); `--max-rate` (default) publishes the next frame as soon as the depth of the previous
one arrived, or after `--timeout` seconds (that frame counts as dropped): bounded and
deterministic. With `--report`, a few sample frames are replayed once more afterwards with the
uncertainty and point-cloud outputs subscribed, for the pictures; latency is measured in the
main pass, where `depth` is the node's only subscribed output.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

import numpy as np

from diffsql_model.data.bag_index import BagHandle
from diffsql_model.data.bag_reader import BagError, decode_image
from diffsql_model.data.lidar import LidarDepth, parse_extrinsic
from diffsql_model.eval import metrics as M
from diffsql_model.eval import protocols as P
from diffsql_ros.bag_player import BagTopics, Player, ReplayFrame, choose_topics, index_camera, schedule, stream_images
from diffsql_ros.dds_profile import PROFILE, shm_only
from diffsql_ros.share import config_path

ROOT = pathlib.Path(__file__).resolve().parents[1]


def default_params_file() -> pathlib.Path:
    """config/depth.yaml of this checkout, else of the installed package share folder."""
    return config_path("depth.yaml")


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


def percentiles(values_ms: list) -> dict:
    if not values_ms:
        return {}
    v = np.asarray(values_ms, dtype=np.float64)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "max": float(v.max()), "mean": float(v.mean()),
            "first": float(v[0])}


def _rgb_of(frame: ReplayFrame) -> np.ndarray:
    return decode_image(frame.image, frame.image_type)  # the node's decoders, on the bag message


def load_bag(args) -> tuple[BagTopics, list[ReplayFrame], dict, LidarDepth]:
    """(topics, camera index, stamp -> (K, (width, height)), LiDAR ground truth) of the bag:
    everything that can be wrong with it fails here, before the node starts."""
    # closed after indexing; the ground truth's first read during the replay opens it again
    with BagHandle(args.bag) as bag:
        topics = choose_topics(bag.reader(), args.image_topic, args.camera_info_topic, args.lidar_topic)
        frames = index_camera(bag.reader(), topics)
        cameras = {f.stamp_ns: f.camera() for f in frames}
        truth = LidarDepth.from_bag(bag, topics.lidar, frames[0].frame_id, parse_extrinsic(args.extrinsic),
                                    args.lidar_tolerance)
    return topics, frames, cameras, truth


def pick_samples(frames, truth: LidarDepth, n: int) -> list:
    """Up to n frames spread over the bag, preferring frames that have a LiDAR scan."""
    if n <= 0:
        return []
    with_gt = [f for f in frames if truth.has_scan(f.stamp_ns)] or list(frames)
    idx = np.unique(np.linspace(0, len(with_gt) - 1, min(n, len(with_gt))).round().astype(int))
    return [with_gt[i] for i in idx]


def run(args) -> dict:
    # ROS 2 (rclpy, message packages) only here: the rest of the module imports without it
    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    from diffsql_ros.evaluator_node import DepthEvaluator

    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    topics, frames, cameras, truth = load_bag(args)
    if args.max_frames:
        frames = frames[: args.max_frames]
    args.topics = topics
    cfg = P.EvalConfig.for_protocol("bag", scaling=args.scaling, scale=args.scale)
    samples = pick_samples(frames, truth, args.report_frames if args.report else 0)

    ns = f"/diffsql_bag_eval_{os.getpid()}"
    compressed = topics.image_type.endswith("CompressedImage")
    log_path = (args.report / "depth_node.log") if args.report else None
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    node_params = list(args.node_param)
    if getattr(args, "sd_path", None):
        node_params.append(f"sd_path:={args.sd_path}")
    node_proc = NodeProcess(ns, args.checkpoint, args.params_file, compressed, node_params, log_path)
    context = rclpy.Context()
    rclpy.init(context=context)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    spin = threading.Thread(target=executor.spin, daemon=True)
    evaluator = None
    try:
        from rclpy.node import Node

        player_node = Node("diffsql_bag_player", context=context)
        image_topic = f"{ns}/image/compressed" if compressed else f"{ns}/image"
        player = Player(player_node, image_topic, f"{ns}/camera_info", topics.image_type)
        evaluator = DepthEvaluator(ns, lambda stamp: truth.depth_map(stamp, *cameras[stamp]), cfg, context=context)
        executor.add_node(player_node)
        executor.add_node(evaluator)
        spin.start()
        t_start = time.monotonic()
        try:
            evaluator.connect(args.startup_timeout, node_proc.alive)
            if not player.wait_for_subscribers(args.startup_timeout, node_proc.alive):
                raise TimeoutError("the depth node did not subscribe to the image topic")
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"depth node did not start: {e}\n--- depth node log ---\n{node_proc.log_tail()}") from None
        startup_s = time.monotonic() - t_start
        played, kept = _play(frames, player, evaluator, node_proc, args, {f.stamp_ns for f in samples})
        samples = [kept[f.stamp_ns] for f in samples if f.stamp_ns in kept]
        result = evaluator.result()
        latencies = []
        for f in played:
            t_pub, t_recv = player.publish_time(f.stamp_ns), evaluator.received.get(f.stamp_ns)
            if t_pub is not None and t_recv is not None:
                latencies.append((t_recv - t_pub) * 1e3)
        received = [evaluator.received[f.stamp_ns] for f in played if f.stamp_ns in evaluator.received]
        first_pub = player.publish_time(played[0].stamp_ns) if played else None
        replay_s = (player.publish_time(played[-1].stamp_ns) - first_pub) if played else 0.0
        span = (max(received) - first_pub) if received and first_pub is not None else 0.0
        pictures = _sample_pass(samples, player, evaluator, node_proc, args) if samples else []
        if not node_proc.alive():
            raise RuntimeError(f"the depth node exited during the replay\n--- depth node log ---\n{node_proc.log_tail()}")
    finally:
        executor.shutdown(timeout_sec=2.0)
        rc = node_proc.stop()
        if evaluator is not None:
            evaluator.destroy_node()
        rclpy.try_shutdown(context=context)
        truth.close()

    n_recv = len(received)
    summary = {
        "bag": str(args.bag), "checkpoint": str(args.checkpoint),
        "topics": {"image": topics.image, "camera_info": topics.camera_info, "lidar": topics.lidar},
        "extrinsic_source": truth.extrinsic_source,
        "mode": "max-rate" if args.rate is None else f"rate x{args.rate:g}",
        "frames_played": len(played), "frames_received": n_recv,
        "frames_dropped": len(played) - n_recv,
        "frames_evaluated": len(result["per_frame"]),
        "frames_without_lidar": len(result["missing"]),
        "latency_ms": percentiles(latencies),
        "throughput_fps": (n_recv / span) if span > 0 else None,
        "replay_s": replay_s,  # first to last image published
        "startup_s": startup_s,
        "metrics": result["metrics"], "scaling": result["scaling"],
        "protocol": {k: v for k, v in cfg.to_dict().items() if k != "gt_depth"},  # gt_depth: eigen only
        "gt_depth": truth.depth_definition,
        "errors": result["errors"], "missing": result["missing"], "per_frame": result["per_frame"],
        "node": {"command": node_proc.cmd, "exit_code": rc, "params_file": str(args.params_file),
                 "fastdds_profile": os.environ["FASTDDS_DEFAULT_PROFILES_FILE"]},
        "pictures": pictures,
    }
    if args.report:
        summary["report"] = str(write_bag_report(summary, args.report))
    return summary


def _play(frames, player: Player, evaluator, node_proc: NodeProcess, args, keep=frozenset()):
    """Main pass: images streamed from the bag and published. Returns (frames published, all of
    them unless the node died; {stamp: frame with its image} for the stamps in `keep`)."""
    played, kept = [], {}
    t0 = None
    stream = stream_images(args.bag, args.topics, frames)
    for i, ((frame, at), loaded) in enumerate(zip(schedule(frames, args.rate), stream)):
        if not node_proc.alive():
            break
        t0 = time.monotonic() if t0 is None else t0  # the clock starts at the first publish
        wait = t0 + at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        player.publish(loaded)
        played.append(frame)
        if frame.stamp_ns in keep:
            kept[frame.stamp_ns] = loaded
        if args.rate is None:  # backpressure: the next frame only when this one's depth is out
            timeout = args.first_timeout if i == 0 else args.timeout
            evaluator.wait_for(frame.stamp_ns, timeout, node_proc.alive)
        if args.progress:
            print(f"\r{args.progress}: frame {i + 1}/{len(frames)}", end="", file=sys.stderr, flush=True)
    stream.close()
    if args.progress:
        print(file=sys.stderr)
    # --rate: the node drops frames it cannot keep up with; those never come, so stop waiting
    # once it has been idle for twice the slowest latency seen (at least 3 s).
    lat = [evaluator.received[f.stamp_ns] - player.publish_time(f.stamp_ns)
           for f in played if f.stamp_ns in evaluator.received]
    evaluator.wait_quiet({f.stamp_ns for f in played}, args.timeout if args.rate is not None else 0.5,
                         node_proc.alive, idle_s=max(3.0, 2 * max(lat, default=0.0)))
    return played, kept


def _sample_pass(samples, player: Player, evaluator, node_proc: NodeProcess, args) -> list:
    """Replay the sample frames with uncertainty and points subscribed; keep their outputs."""
    evaluator.watch_samples([f.stamp_ns for f in samples], args.startup_timeout)
    out = []
    for frame in samples:
        if not node_proc.alive():
            break
        player.publish(frame)
        evaluator.wait_for_sample(frame.stamp_ns, args.timeout, node_proc.alive)
        s = evaluator.samples.get(frame.stamp_ns)
        out.append({"stamp_ns": frame.stamp_ns, "index": frame.index, "rgb": _rgb_of(frame), "sample": s})
    return out


def write_bag_report(summary: dict, out_dir: pathlib.Path) -> pathlib.Path:
    """index.html + PNGs for one replay; `summary['pictures']` becomes file names (JSON-able)."""
    from diffsql_ros import report as R  # imports sensor_msgs (ROS 2): only with --report

    rows = []
    pics = []
    for p in summary["pictures"]:
        s = p["sample"]
        if s is None or s.depth is None:
            continue
        images = R.frame_pictures(out_dir, f"frame{p['index']:04d}", p["rgb"], s.depth, s.uncertainty,
                                  s.xyz, s.rgb, cloud_note=None if s.xyz is None else
                                  f"node 'points': {len(s.xyz)} points, oblique view")
        caption = f"frame {p['index']} (stamp {p['stamp_ns'] / 1e9:.3f} s)"
        rows.append(R.FrameRow(caption, images))
        pics.append({"caption": caption, "images": images})
    summary["pictures"] = pics
    name = pathlib.Path(summary["bag"]).name
    sec = R.Section(f"Replay of {name}", paragraphs=[
        f"Mode {summary['mode']}; depth node: {' '.join(summary['node']['command'][1:4])} with "
        f"{summary['node']['params_file']}; extrinsic from {summary['extrinsic_source']}; "
        f"ground truth: {summary['gt_depth']}."],
        tables=[R.metrics_table([(name, {**(summary['metrics'] or {}), 'count': summary['frames_evaluated']},
                                  "median scaling" if summary["scaling"]["mode"] == "median" else "fixed scale")]),
                R.latency_table([(name, summary)], "latency: image published -> depth received")],
        frames=rows)
    return R.write_report(out_dir / "index.html", f"diffsql-bag-eval: {name}", [sec])


def format_summary(s: dict) -> str:
    lat = s["latency_ms"]
    lines = [f"{s['bag']}: played {s['frames_played']}, evaluated {s['frames_evaluated']}, "
             f"dropped {s['frames_dropped']}, without LiDAR {s['frames_without_lidar']} ({s['mode']})"]
    if lat:
        lines.append(f"latency ms: p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}  "
                     f"max {lat['max']:.1f}  (first frame {lat['first']:.1f})")
    for e in s["errors"][:5]:
        lines.append(f"  error: {e}")
    if s["metrics"]:
        lines.append(M.format_table(s["metrics"]))
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="diffsql-bag-eval", description=__doc__.split("\n")[0])
    ap.add_argument("bag", type=pathlib.Path, help="ROS 1 .bag file or ROS 2 bag folder (sqlite3 / mcap)")
    ap.add_argument("--checkpoint", type=pathlib.Path, required=True)
    ap.add_argument("--image-topic")
    ap.add_argument("--camera-info-topic")
    ap.add_argument("--lidar-topic")
    ap.add_argument("--extrinsic", help="LiDAR -> camera optical frame, 'x y z qx qy qz qw' or 12/16 "
                    "row-major numbers (default: /tf_static of the bag)")
    timing = ap.add_mutually_exclusive_group()
    timing.add_argument("--rate", type=float, help="publish at this multiple of the recorded timing")
    timing.add_argument("--max-rate", action="store_true", help="as fast as the node keeps up (default)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for one depth image")
    ap.add_argument("--first-timeout", type=float, default=120.0, help="... for the first one (warm-up)")
    ap.add_argument("--startup-timeout", type=float, default=120.0, help="seconds for the node to come up")
    ap.add_argument("--lidar-tolerance", type=float, default=0.05, help="seconds between image and scan stamps")
    ap.add_argument("--max-frames", type=int, default=0, help="replay only the first N frames (0 = all)")
    ap.add_argument("--scaling", choices=("median", "fixed"), default="median")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--params-file", type=pathlib.Path, default=default_params_file())
    ap.add_argument("--sd-path", type=pathlib.Path,
                    help="local SD folder, for checkpoints without the frozen SD weights (default: as trained)")
    ap.add_argument("--node-param", action="append", default=[], metavar="NAME:=VALUE",
                    help="extra depth node parameter (repeatable)")
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--report", type=pathlib.Path, help="folder for index.html and pictures")
    ap.add_argument("--report-frames", type=int, default=3)
    ap.add_argument("--progress", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        ap.error("--rate must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with local_dds_environment():
            summary = run(args)
    except (BagError, FileNotFoundError, ValueError, RuntimeError, TimeoutError) as e:
        print(f"diffsql-bag-eval: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if args.json:
        M.write_json(summary, args.json)
        print(f"wrote {args.json}")
    if args.report:
        print(f"wrote {summary['report']}")
    return 0 if summary["frames_evaluated"] else 1


if __name__ == "__main__":
    sys.exit(main())
