"""Throughput of one model serving N cameras: N frames in one batched call (what the node's
`cameras` parameter does) against N single-frame calls (the model's work of one node per
camera, without the N model copies and N processes such a setup also pays).

    .venv/bin/python bench/multi_camera.py [--cameras 1 2 4] [--size 375x1242] [--net 192x640]
    .venv/bin/python bench/multi_camera.py --device cuda --runtime compile   # on a GPU

Frames are real KITTI images (camera-sized, resized by the estimator as in the node); weights
are random (speed does not depend on them). Prints frames per second per setting and the ratio
batched / single-camera rate; the goal on a GPU is >= 0.7 N.
"""
from __future__ import annotations

import argparse
import os
import pathlib
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
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    H, W = (int(v) for v in a.size.split("x"))
    h, w = (int(v) for v in a.net.split("x"))
    torch.manual_seed(0)
    cfg = get_preset(a.preset, height=h, width=w)
    model = DiffSQLDepth(cfg).eval()
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
        rows.append((n, batched, one_by_one, batched / single))
    print(f"\n{a.preset} {h}x{w}, camera {H}x{W}, {a.device} {a.precision} {a.runtime}, "
          f"outputs at {a.output_resolution} resolution, {a.threads} threads, median of {a.runs}")
    print("| cameras | batched (frames/s) | one call per camera (frames/s) | batched / 1-camera rate |")
    print("|---|---|---|---|")
    for n, b, s, r in rows:
        print(f"| {n} | {b:.1f} | {s:.1f} | {r:.2f} (goal on GPU >= {0.7 * n:.1f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
