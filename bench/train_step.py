"""Training step time split into data loading, forward (depth + pose + loss) and backward
(+ optimizer step), and images/s, for CPU-sized presets on the real KITTI sample.

    .venv/bin/python bench/train_step.py [--presets lite tiny_sd] [--size 96x320] [--batch 4]
        [--steps 5] [--threads N] [--device cpu] [--frames 0,-1,1]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
DRIVE = "2011_09_26/2011_09_26_drive_0023_sync"  # real frames 0-6, both cameras


def bench(preset: str, height: int, width: int, batch: int, steps: int, device: str, frames, tmp) -> dict:
    from diffsql_model.train.config import TrainConfig
    from diffsql_model.train.trainer import Trainer

    split = pathlib.Path(tmp) / "train.txt"
    split.write_text("".join(f"{DRIVE} {f} {s}\n" for f in range(1, 6) for s in "lr"))
    cfg = TrainConfig.from_dict({
        "model": {"preset": preset, "overrides": {"height": height, "width": width}},
        "data": {"kind": "kitti", "root": str(SHARED / "data" / "kitti" / "raw"),
                 "train_split": str(split), "frame_ids": frames},
        "optim": {"batch_size": batch},
        "runtime": {"device": device, "num_workers": 0, "progress": False},
    })
    trainer = Trainer(cfg, pathlib.Path(tmp) / preset)
    times = {"data": [], "forward": [], "backward": []}
    it = iter(trainer.loader)
    for i in range(steps + 1):  # the first step warms up allocators and is not counted
        t0 = time.perf_counter()
        try:
            batch_ = next(it)
        except StopIteration:
            it = iter(trainer.loader)
            batch_ = next(it)
        batch_ = trainer._to_device(batch_)
        t_data = time.perf_counter() - t0
        _, _, t_fwd, t_bwd = trainer.train_step(batch_)
        if i:
            times["data"].append(t_data)
            times["forward"].append(t_fwd)
            times["backward"].append(t_bwd)
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    total = sum(mean.values())
    trainable = sum(p.numel() for p in trainer.params)
    return {**mean, "step": total, "images_per_s": batch / total, "trainable_M": trainable / 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["lite", "tiny_sd"])
    p.add_argument("--size", default="96x320")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames", default="0,-1,1", help="frame ids: 0,-1,1 (M), 0,-1,1,s (MS), 0,s (stereo)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    h, w = (int(v) for v in a.size.lower().split("x"))
    frames = [f if f == "s" else int(f) for f in a.frames.split(",")]
    print(f"device {a.device}, {torch.get_num_threads()} threads, {h}x{w}, batch {a.batch}, "
          f"frames {frames}, mean of {a.steps} steps after 1 warm-up")
    head = f"{'preset':<10}{'trainable M':>12}{'data ms':>10}{'fwd ms':>10}{'bwd ms':>10}{'step ms':>10}{'img/s':>8}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets:
            r = bench(preset, h, w, a.batch, a.steps, a.device, frames, tmp)
            rows.append(f"{preset:<10}{r['trainable_M']:>12.2f}{r['data'] * 1e3:>10.0f}{r['forward'] * 1e3:>10.0f}"
                        f"{r['backward'] * 1e3:>10.0f}{r['step'] * 1e3:>10.0f}{r['images_per_s']:>8.2f}")
    print(head)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
