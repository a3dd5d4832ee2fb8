"""Training step time split into data loading, forward (depth + pose + loss) and backward
(+ optimizer step), images/s and (CUDA) peak GPU memory, per preset on the real KITTI sample.

    .venv/bin/python bench/train_step.py [--presets lite tiny_sd] [--size 96x320] [--batch 4]
        [--steps 5] [--threads N] [--device cpu] [--frames 0,-1,1] [--precision fp32]
    python bench/train_step.py --device cuda --presets lite r50 diffsql_r50 --size 192x640 --batch 12
SD presets build their UNet from the preset's architecture with random weights (diffsql_r50:
the SD v1.5-size UNet; sd.allow_random_weights is set), frozen as in training, and the encoders
start from random weights too: speed and memory do not depend on them. On CUDA the data time
includes the host-to-device copy (synchronised), and the trainer waits for the GPU at the end of
each step, so step times are wall times of the whole step. --json writes the rows for
bench/gpu_table.py.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = pathlib.Path(os.environ.get("DIFFSQL_SHARED", ROOT.parent / "shared")).resolve()
DRIVE = "2011_09_26/2011_09_26_drive_0023_sync"  # real frames 0-6, both cameras


def bench(preset: str, height: int, width: int, batch: int, steps: int, device: str, frames, tmp,
          precision: str = "fp32") -> dict:
    from diffsql_model.presets import get_preset
    from diffsql_model.train.config import TrainConfig
    from diffsql_model.train.trainer import Trainer

    split = pathlib.Path(tmp) / "train.txt"
    lines = [f"{DRIVE} {f} {s}\n" for f in range(1, 6) for s in "lr"]
    split.write_text("".join(lines * -(-2 * batch // len(lines))))  # at least two batches
    overrides = {"height": height, "width": width, "weights": "none"}
    if get_preset(preset).sd.enabled:
        overrides["sd"] = {"allow_random_weights": True}  # speed does not depend on the weights
    cfg = TrainConfig.from_dict({
        "model": {"preset": preset, "overrides": overrides},
        "data": {"kind": "kitti", "root": str(SHARED / "data" / "kitti" / "raw"),
                 "train_split": str(split), "frame_ids": frames},
        "optim": {"batch_size": batch},
        "runtime": {"device": device, "num_workers": 0, "progress": False, "precision": precision},
    })
    trainer = Trainer(cfg, pathlib.Path(tmp) / f"{preset}_{precision}")
    times = {"data": [], "forward": [], "backward": []}
    it = iter(trainer.loader)
    cuda = trainer.device.type == "cuda"
    for i in range(steps + 1):  # the first step warms up allocators and is not counted
        t0 = time.perf_counter()
        try:
            batch_ = next(it)
        except StopIteration:
            it = iter(trainer.loader)
            batch_ = next(it)
        batch_ = trainer._to_device(batch_)
        if cuda:
            torch.cuda.synchronize(trainer.device)  # the non-blocking copies belong to the data time
        t_data = time.perf_counter() - t0
        _, _, t_fwd, t_bwd = trainer.train_step(batch_)
        if i == 0 and cuda:
            torch.cuda.reset_peak_memory_stats(trainer.device)
        if i:
            times["data"].append(t_data)
            times["forward"].append(t_fwd)
            times["backward"].append(t_bwd)
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    total = sum(mean.values())
    trainable = sum(p.numel() for p in trainer.params)
    peak = torch.cuda.max_memory_allocated(trainer.device) / 2**30 if cuda else float("nan")
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    compute = mean["forward"] + mean["backward"]
    return {**mean, "step": total, "images_per_s": batch / total, "compute": compute,
            "images_per_s_compute": batch / compute, "trainable_M": trainable / 1e6, "peak_GiB": peak,
            "preset": preset, "precision": precision, "batch": batch}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["lite", "tiny_sd"])
    p.add_argument("--size", default="96x320")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames", default="0,-1,1", help="frame ids: 0,-1,1 (M), 0,-1,1,s (MS), 0,s (stereo)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "bf16", "fp16"),
                   help="runtime.precision (fp16: CUDA with loss scaling)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    h, w = (int(v) for v in a.size.lower().split("x"))
    frames = [f if f == "s" else int(f) for f in a.frames.split(",")]
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"device {a.device} ({name}), torch {torch.__version__}, {h}x{w}, batch {a.batch}, "
          f"frames {frames}, mean of {a.steps} steps after 1 warm-up; data = loading on 1 process")
    head = (f"{'preset':<12}{'precision':>10}{'trainable M':>12}{'data ms':>10}{'fwd ms':>10}{'bwd ms':>10}"
            f"{'step ms':>10}{'img/s':>8}{'GPU GiB':>9}")
    rows, results = [], []
    cuda = a.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets:
            for prec in a.precision:
                r = bench(preset, h, w, a.batch, a.steps, a.device, frames, tmp, prec)
                results.append(r)
                rows.append(f"{preset:<12}{prec:>10}{r['trainable_M']:>12.2f}{r['data'] * 1e3:>10.0f}"
                            f"{r['forward'] * 1e3:>10.0f}{r['backward'] * 1e3:>10.0f}{r['step'] * 1e3:>10.0f}"
                            f"{r['images_per_s']:>8.2f}" + (f"{r['peak_GiB']:>9.2f}" if cuda else f"{'-':>9}"))
                print(rows[-1], flush=True)
    print(head)
    print("\n".join(rows))
    if a.json:
        meta = {"device": f"{a.device} ({name})", "height": h, "width": w, "batch": a.batch, "steps": a.steps,
                "frames": a.frames, "torch": torch.__version__}
        pathlib.Path(a.json).write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
