"""Throughput of one model serving N cameras: N frames in one batched call (what the node's
`cameras` parameter does) against N single-frame calls in the same process, and against N
processes with a model each (one node per camera: N model copies competing for the device).

    .venv/bin/python bench/multi_camera.py [--cameras 1 2 4] [--size 375x1242] [--net 192x640]
    .venv/bin/python bench/multi_camera.py --device cuda --runtime compile   # on a GPU

`--processes` adds the N-process column: each process loads its own model, they start together
and run single-frame calls for `--seconds`; the column is all their frames over the wall time,
and the RSS column the sum of their resident memory (the model copies). Frames are real KITTI images (camera-sized, resized by the estimator as in the node); weights
are random (speed does not depend on them). Prints frames per second per setting and the ratio
batched / single-camera rate; the goal on a GPU is >= 0.7 N.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pathlib
import queue as queue_module
import statistics
import sys
import time

import cv2
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffsql_model.depth_net import DiffSQLDepth  # noqa: E402
from diffsql_model.inference import DepthEstimator  # noqa: E402
from diffsql_model.presets import get_preset  # noqa: E402

SHARED = pathlib.Path(os.environ.get("DIFFSQL_SHARED", ROOT.parent / "shared"))
DRIVE = "2011_09_26/2011_09_26_drive_0023_sync"  # the frames bench/gpu_check.sh --pack carries
FRAMES = sorted((SHARED / "data/kitti/raw" / DRIVE / "image_02/data").glob("*.png"))


def rate(fn, frames: int, runs: int) -> float:
    """Frames per second of fn() (which handles `frames` frames), median of `runs` timed calls."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return frames / statistics.median(times)


def _build(a):
    h, w = (int(v) for v in a.net.split("x"))
    torch.manual_seed(0)
    cfg = get_preset(a.preset, height=h, width=w)
    return DiffSQLDepth(cfg).eval(), cfg, (h, w)


def _camera_process(a, image, barrier, queue) -> None:
    """One node per camera: its own model, single frames for a.seconds after every process is ready."""
    torch.set_num_threads(a.threads)
    model, cfg, net = _build(a)
    est = DepthEstimator(model, cfg, a.device, a.precision, net, runtime=a.runtime)
    est.warmup(image.shape[:2])
    est.predict(image, full_size=a.output_resolution == "input")
    barrier.wait(timeout=600)  # a sibling that died before it breaks the barrier: no hang
    t0, frames = time.perf_counter(), 0
    while time.perf_counter() - t0 < a.seconds:
        est.predict(image, full_size=a.output_resolution == "input")
        frames += 1
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    queue.put((frames, time.perf_counter() - t0, rss))


def processes_rate(a, images) -> tuple[float, float]:
    """(frames/s of all processes together, summed RSS in MiB) for one process per image."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(images)), ctx.Queue()
    procs = [ctx.Process(target=_camera_process, args=(a, im, barrier, queue)) for im in images]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=5))
        except queue_module.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a camera process failed (exit codes {dead})") from None
    for p in procs:
        p.join(timeout=60)
    return sum(f for f, _, _ in results) / max(t for _, t, _ in results), sum(r for _, _, r in results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--size", default="375x1242", help="camera image HxW")
    ap.add_argument("--net", default="192x640", help="network input HxW")
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--runtime", default="eager")
    ap.add_argument("--output-resolution", choices=("input", "network"), default="input")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, per process")
    ap.add_argument("--processes", action="store_true", help="also run one process per camera")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed run of each process")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    H, W = (int(v) for v in a.size.split("x"))
    model, cfg, (h, w) = _build(a)
    full = a.output_resolution == "input"
    images = [cv2.resize(cv2.imread(str(p))[..., ::-1], (W, H)) for p in FRAMES[: max(a.cameras)]]
    images += [images[0]] * (max(a.cameras) - len(images))
    rows, single = [], None
    for n in a.cameras:
        est = DepthEstimator(model, cfg, a.device, a.precision, (h, w), runtime=a.runtime, max_batch=n)
        est.warmup((H, W))
        frames = images[:n]
        batched = rate(lambda: est.predict_batch(frames, full_size=full), n, a.runs)
        one_by_one = rate(lambda: [est.predict(f, full_size=full) for f in frames], n, a.runs)
        single = single or one_by_one
        procs = processes_rate(a, frames) if a.processes else (float("nan"), float("nan"))
        rows.append((n, batched, one_by_one, batched / single, *procs))
    print(f"\n{a.preset} {h}x{w}, camera {H}x{W}, {a.device} {a.precision} {a.runtime}, "
          f"outputs at {a.output_resolution} resolution, {a.threads} threads, median of {a.runs}")
    print("| cameras | batched (frames/s) | one call per camera (frames/s) | batched / 1-camera rate "
          "| one process per camera (frames/s) | their RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for n, b, s, r, pr, rss in rows:
        print(f"| {n} | {b:.1f} | {s:.1f} | {r:.2f} (goal on GPU >= {0.7 * n:.1f}) | {pr:.1f} | {rss:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
