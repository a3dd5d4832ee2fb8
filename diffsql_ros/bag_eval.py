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
main pass, where `depth` is the node's only subscribed output (with `--uncertainty`, also
`depth/uncertainty`).

`--uncertainty`: every frame's depth and uncertainty (std, metres) scored by sparsification:
AUSE and AURG for AbsRel and RMSE, ranked by std and by std / depth (the same numbers as
`diffsql-eval --protocol bag --uncertainty`). Always: the scale stability of the frames in stamp
order (CV and median frame-to-frame change of median(gt) / median(depth)) for the node's
`scale.mode` of this replay (params file, or `--node-param scale.mode:=camera_height`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys

import numpy as np
import yaml

from diffsql_model.data.bag_index import BagHandle
from diffsql_model.data.bag_reader import BagError
from diffsql_model.data.lidar import LidarDepth, parse_extrinsic
from diffsql_model.eval import metrics, protocols, scale_stability, sparsification
from diffsql_ros.bag_player import BagTopics, ReplayFrame, choose_topics, index_camera
from diffsql_ros.replay import ReplaySettings, local_dds_environment, play, replay_samples, replay_session
from diffsql_ros.scale import ScaleConfig
from diffsql_ros.share import config_path


def default_params_file() -> pathlib.Path:
    """config/depth.yaml of this checkout, else of the installed package share folder."""
    return config_path("depth.yaml")


def percentiles(values_ms: list) -> dict:
    if not values_ms:
        return {}
    v = np.asarray(values_ms, dtype=np.float64)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "max": float(v.max()), "mean": float(v.mean()),
            "first": float(v[0])}


def load_bag(settings: ReplaySettings) -> tuple[BagTopics, list[ReplayFrame], dict, LidarDepth]:
    """(topics, camera index, stamp -> (K, (width, height)), LiDAR ground truth) of the bag:
    everything that can be wrong with it fails here, before the node starts."""
    # closed after indexing; the ground truth's first read during the replay opens it again
    with BagHandle(settings.bag) as bag:
        topics = choose_topics(bag.reader(), settings.image_topic, settings.camera_info_topic, settings.lidar_topic)
        frames = index_camera(bag.reader(), topics)
        cameras = {f.stamp_ns: f.camera() for f in frames}
        truth = LidarDepth.from_bag(bag, topics.lidar, frames[0].frame_id, parse_extrinsic(settings.extrinsic),
                                    settings.lidar_tolerance)
    return topics, frames, cameras, truth


def node_scale_mode(settings: ReplaySettings) -> str:
    """The depth node's scale.mode in this replay: the last --node-param scale.mode:=X, else the
    params file's (nested `scale: {mode: X}` or flat `scale.mode: X`), else the node's default."""
    for p in reversed(settings.node_params):
        if p.startswith("scale.mode:="):
            return p.split(":=", 1)[1]
    for node in (yaml.safe_load(settings.params_file.read_text()) or {}).values():
        params = (node or {}).get("ros__parameters") or {}
        mode = params.get("scale.mode") or (params.get("scale") or {}).get("mode")
        if mode:
            return str(mode)
    return ScaleConfig().mode


def stability_of(per_frame: list, scale_mode: str) -> dict | None:
    """Scale stability of the evaluated frames in stamp order (their keys are stamps in seconds)."""
    if not per_frame:
        return None
    ordered = sorted(per_frame, key=lambda f: float(f["frame"]))
    return {"scale_mode": scale_mode, **scale_stability.from_per_frame(ordered)}


def pick_samples(frames, truth: LidarDepth, n: int) -> list:
    """Up to n frames spread over the bag, preferring frames that have a LiDAR scan."""
    if n <= 0:
        return []
    with_gt = [f for f in frames if truth.has_scan(f.stamp_ns)] or list(frames)
    idx = np.unique(np.linspace(0, len(with_gt) - 1, min(n, len(with_gt))).round().astype(int))
    return [with_gt[i] for i in idx]


def run(settings: ReplaySettings) -> dict:
    """Replay the bag through the depth node; the summary written as --json."""
    if not settings.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {settings.checkpoint}")
    topics, frames, cameras, truth = load_bag(settings)
    if settings.max_frames:
        frames = frames[: settings.max_frames]
    cfg = protocols.EvalConfig.for_protocol("bag", scaling=settings.scaling, scale=settings.scale)
    samples = pick_samples(frames, truth, settings.report_frames if settings.report else 0)

    def ground_truth(stamp):
        return truth.depth_map(stamp, *cameras[stamp])

    with contextlib.closing(truth), replay_session(settings, topics.image_type, ground_truth, cfg) as session:
        played, kept = play(frames, session, settings, topics, {f.stamp_ns for f in samples})
        samples = [kept[f.stamp_ns] for f in samples if f.stamp_ns in kept]
        unc = None
        if session.uncertainty:
            session.uncertainty.wait_for(set(session.evaluator.received), settings.timeout, session.node.alive)
            unc = session.uncertainty.result()
        result = session.evaluator.result()
        timing = replay_timing(played, session.player, session.evaluator)
        pictures = replay_samples(samples, session, settings) if samples else []
        session.require_alive("during the replay")
    summary = {
        "bag": str(settings.bag), "checkpoint": str(settings.checkpoint),
        "topics": {"image": topics.image, "camera_info": topics.camera_info, "lidar": topics.lidar},
        "extrinsic_source": truth.extrinsic_source,
        "mode": "max-rate" if settings.rate is None else f"rate x{settings.rate:g}",
        "frames_played": len(played), "frames_received": timing["received"],
        "frames_dropped": len(played) - timing["received"],
        "frames_evaluated": len(result["per_frame"]),
        "frames_without_lidar": len(result["missing"]),
        "latency_ms": percentiles(timing["latencies_ms"]),
        "latencies_ms": timing["latencies_ms"],  # per frame received, in play order
        "throughput_fps": timing["throughput_fps"],
        "replay_s": timing["replay_s"],  # first to last image published
        "startup_s": session.startup_s,
        "metrics": result["metrics"], "scaling": result["scaling"],
        "scale_mode": node_scale_mode(settings),
        "protocol": {k: v for k, v in cfg.to_dict().items() if k != "gt_depth"},  # gt_depth: eigen only
        "gt_depth": truth.depth_definition,
        "errors": result["errors"], "missing": result["missing"], "per_frame": result["per_frame"],
        "node": {"command": session.node.cmd, "exit_code": session.node.proc.returncode,
                 "params_file": str(settings.params_file),
                 "fastdds_profile": os.environ["FASTDDS_DEFAULT_PROFILES_FILE"]},
        "pictures": pictures,
    }
    summary["scale_stability"] = stability_of(summary["per_frame"], summary["scale_mode"])
    if unc is not None:
        add_uncertainty(summary, unc)
    if settings.report:
        summary["report"] = str(write_bag_report(summary, settings.report))
    return summary


def add_uncertainty(summary: dict, unc: dict) -> None:
    """The UncertaintyScorer's result into the summary: the mean scores, each frame's own next to
    its depth metrics, and its errors (a frame it could not score) with the evaluator's."""
    summary["uncertainty"] = unc["uncertainty"]
    by_frame = {f["frame"]: f["uncertainty"] for f in unc["per_frame"]}
    for f in summary["per_frame"]:
        if f["frame"] in by_frame:
            f["uncertainty"] = by_frame[f["frame"]]
    summary["errors"] = summary["errors"] + unc["errors"]
    summary["frames_with_uncertainty"] = len(unc["per_frame"])


def replay_timing(played: list[ReplayFrame], player, evaluator) -> dict:
    """Latency (image published -> its depth received), depth images received, throughput and
    the time from the first to the last image published."""
    latencies = []
    for f in played:
        t_pub, t_recv = player.publish_time(f.stamp_ns), evaluator.received.get(f.stamp_ns)
        if t_pub is not None and t_recv is not None:
            latencies.append((t_recv - t_pub) * 1e3)
    received = [evaluator.received[f.stamp_ns] for f in played if f.stamp_ns in evaluator.received]
    first_pub = player.publish_time(played[0].stamp_ns) if played else None
    replay_s = (player.publish_time(played[-1].stamp_ns) - first_pub) if played else 0.0
    span = (max(received) - first_pub) if received and first_pub is not None else 0.0
    return {"latencies_ms": latencies, "received": len(received), "replay_s": replay_s,
            "throughput_fps": (len(received) / span) if span > 0 else None}


def write_bag_report(summary: dict, out_dir: pathlib.Path) -> pathlib.Path:
    """index.html + PNGs for one replay; `summary['pictures']` becomes file names (JSON-able)."""
    from diffsql_ros import report  # imports sensor_msgs (ROS 2): only with --report

    rows = []
    pics = []
    for p in summary["pictures"]:
        s = p["sample"]
        if s is None or s.depth is None:
            continue
        images = report.frame_pictures(out_dir, f"frame{p['index']:04d}", p["rgb"], s.depth, s.uncertainty,
                                       s.xyz, s.rgb, cloud_note=None if s.xyz is None else
                                       f"node 'points': {len(s.xyz)} points, oblique view")
        caption = f"frame {p['index']} (stamp {p['stamp_ns'] / 1e9:.3f} s)"
        rows.append(report.FrameRow(caption, images))
        pics.append({"caption": caption, "images": images})
    summary["pictures"] = pics
    name = pathlib.Path(summary["bag"]).name
    sec = report.Section(f"Replay of {name}", paragraphs=[
        f"Mode {summary['mode']}; depth node: {' '.join(summary['node']['command'][1:4])} with "
        f"{summary['node']['params_file']}; extrinsic from {summary['extrinsic_source']}; "
        f"ground truth: {summary['gt_depth']}."],
        tables=[report.metrics_table([(name, {**(summary['metrics'] or {}), 'count': summary['frames_evaluated']},
                                       "median scaling" if summary["scaling"]["mode"] == "median"
                                       else "fixed scale")]),
                report.latency_table([(name, summary)], "latency: image published -> depth received")]
        + ([report.uncertainty_table([(name, summary["uncertainty"])], "uncertainty: sparsification")]
           if summary.get("uncertainty") else [])
        + [report.stability_table([(name, summary["scale_mode"], summary["scale_stability"])],
                                  "scale stability: median(gt) / median(depth), frames in stamp order")],
        frames=rows)
    return report.write_report(out_dir / "index.html", f"diffsql-bag-eval: {name}", [sec])


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
        lines.append(metrics.format_table(s["metrics"]))
    if s.get("uncertainty"):
        lines.append(sparsification.format_table(s["uncertainty"]))
    if s.get("scale_stability"):
        lines.append(scale_stability.format_line(s["scale_stability"], f"scale.mode {s['scale_mode']}"))
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
    ap.add_argument("--timeout", type=float, default=ReplaySettings.timeout,
                    help="seconds to wait for one depth image")
    ap.add_argument("--first-timeout", type=float, default=ReplaySettings.first_timeout,
                    help="... for the first one (warm-up)")
    ap.add_argument("--startup-timeout", type=float, default=ReplaySettings.startup_timeout,
                    help="seconds for the node to come up")
    ap.add_argument("--lidar-tolerance", type=float, default=ReplaySettings.lidar_tolerance,
                    help="seconds between image and scan stamps")
    ap.add_argument("--max-frames", type=int, default=ReplaySettings.max_frames,
                    help="replay only the first N frames (0 = all)")
    ap.add_argument("--scaling", choices=("median", "fixed"), default=ReplaySettings.scaling)
    ap.add_argument("--scale", type=float, default=ReplaySettings.scale)
    ap.add_argument("--params-file", type=pathlib.Path, default=default_params_file())
    ap.add_argument("--sd-path", type=pathlib.Path,
                    help="local SD folder, for checkpoints without the frozen SD weights (default: as trained)")
    ap.add_argument("--node-param", dest="node_params", action="append", default=[], metavar="NAME:=VALUE",
                    help="extra depth node parameter (repeatable)")
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--report", type=pathlib.Path, help="folder for index.html and pictures")
    ap.add_argument("--report-frames", type=int, default=ReplaySettings.report_frames)
    ap.add_argument("--uncertainty", action="store_true",
                    help="also score the node's depth/uncertainty by sparsification (AUSE, AURG)")
    ap.add_argument("--progress", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        ap.error("--rate must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with local_dds_environment():
            summary = run(ReplaySettings.from_args(args))
    except (BagError, FileNotFoundError, ValueError, RuntimeError, TimeoutError) as e:
        print(f"diffsql-bag-eval: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if args.json:
        metrics.write_json(summary, args.json)
        print(f"wrote {args.json}")
    if args.report:
        print(f"wrote {summary['report']}")
    return 0 if summary["frames_evaluated"] else 1


if __name__ == "__main__":
    sys.exit(main())
