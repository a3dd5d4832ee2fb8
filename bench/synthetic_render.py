"""Synthetic drive render speed (one camera, one frame) and self-supervised loss speed, on CPU.

    OMP_NUM_THREADS=1 python bench/synthetic_render.py [--frames 6]
Render time excludes scene building; "cpu s" is the process CPU time (less sensitive than
wall time to other jobs on a shared machine); the loss row is one SelfSupervisedLoss call (2 temporal
sources + stereo, batch 1, scale 0) with a depth tensor that requires grad, forward + backward.
Prints a markdown table last.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from diffsql_model.data.synthetic import SyntheticConfig, SyntheticScene, trajectory  # noqa: E402
from diffsql_model.losses import SelfSupervisedLoss  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=6)
    a = p.parse_args(argv)
    rows = []
    for w, h in ((320, 96), (640, 192), (1242, 375)):
        cfg = SyntheticConfig(width=w, height=h, num_frames=a.frames)
        poses, _ = trajectory(cfg)
        scene = SyntheticScene(cfg, float(poses[-1, 2, 3]))
        times, cpu = [], []
        for pose in poses:
            t0, c0 = time.perf_counter(), time.process_time()
            rgb, depth = scene.render(pose)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        rows.append((f"render {w}x{h}", statistics.median(times), max(times), statistics.median(cpu)))
        if w == 640:
            img = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
            K = torch.eye(4)[None]
            K[0, :3, :3] = torch.from_numpy(cfg.K).float()
            d = torch.from_numpy(np.where(depth > 0, depth, 100.0))[None, None].requires_grad_()
            T = {f: torch.eye(4)[None] for f in (-1, 1, "s")}
            loss_times, cpu = [], []
            for _ in range(3):
                t0, c0 = time.perf_counter(), time.process_time()
                SelfSupervisedLoss()(img, {f: img for f in T}, d, K, torch.linalg.inv(K), T)["loss"].backward()
                loss_times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            rows.append(("loss fwd+bwd 640x192, 3 sources", statistics.median(loss_times), max(loss_times),
                         statistics.median(cpu)))
    print(f"torch threads {torch.get_num_threads()}\n| what | median s | max s | median cpu s |\n|---|---|---|---|")
    for name, med, mx, c in rows:
        print(f"| {name} | {med:.4f} | {mx:.4f} | {c:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
