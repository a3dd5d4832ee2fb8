"""DepthNet speed per preset: parameters, forward latency (median), peak memory, fp32 and bf16.

    python bench/model_speed.py                      # all presets, CPU, tiny SD, 192x640
    python bench/model_speed.py --device cuda --sd-arch v1.5 --runs 10 --precisions fp32 fp16 bf16
Weights are random (speed does not depend on them). SD presets use the tiny SD on CPU unless
--sd-arch v1.5 is given. Peak memory: CUDA allocator peak on GPU; on CPU the rise of the
process's peak RSS (VmHWM, reset before the timed runs) over its RSS before them, with
glibc's mmap threshold fixed so freed tensors leave RSS: activation memory of one forward.
Prints a markdown table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from diffsql_model.depth_net import DiffSQLDepth  # noqa: E402
from diffsql_model.presets import PRESETS, get_preset  # noqa: E402


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory rise (MB) over the `with` block."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.base = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif os.path.exists("/proc/self/clear_refs"):
            self.mb = (_status_kb("VmHWM") - self.base) / 1024


def measure(model, image, device, dtype, runs):
    """Median forward latency (ms) and peak memory rise (MB) under autocast(dtype) or fp32."""
    def forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(image)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    out = forward()  # warm-up: one-time allocations (kernel caches, lazy buffers) stay outside
    ok = all(torch.isfinite(v.float()).all() for v in out.values())
    del out
    times = []
    with PeakMemory(device) as mem:
        for _ in range(runs):
            t = time.perf_counter()
            forward()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), mem.mb, ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--height", type=int, default=192)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sd-arch", choices=("tiny", "v1.5"), default=None,
                    help="SD architecture for SD presets (default: tiny on CPU, the preset's on GPU)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=None,
                    help="autocast precisions (default: fp32 bf16; fp16 only on CUDA)")
    args = ap.parse_args(argv)
    if argv is None and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # A fixed mmap threshold makes glibc return every large tensor to the OS when freed
        # (by default it raises the threshold and keeps them), so RSS peaks are per forward.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = args.precisions or ["fp32", "bf16"]
    if device.type == "cpu" and "fp16" in precisions:
        ap.error("fp16 autocast is a CUDA path (CPU half convolutions are slow or missing)")
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    sd_arch = args.sd_arch or ("tiny" if device.type == "cpu" else None)
    name_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"# DepthNet forward, {args.batch} x 3 x {args.height} x {args.width}, {name_dev}, "
          f"median of {args.runs} runs, torch {torch.__version__}", flush=True)
    rows = []
    for name in args.presets:
        cfg = get_preset(name, weights="none", height=args.height, width=args.width)
        if cfg.sd.enabled and sd_arch:
            cfg = dataclasses.replace(cfg, sd=dataclasses.replace(cfg.sd, arch=sd_arch))
        torch.manual_seed(0)
        model = DiffSQLDepth(cfg).to(device).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        image = torch.rand(args.batch, 3, args.height, args.width, device=device)
        res = {p: measure(model, image, device, dtypes[p], args.runs) for p in precisions}
        sd = f"{cfg.sd.arch}/{cfg.sd.layer}" if cfg.sd.enabled else "off"
        rows.append((name, cfg.backbone, sd, cfg.query_mode, params, trainable, res))
        print(f"{name}: " + ", ".join(f"{k} {ms:.1f} ms {mb:.0f} MB{'' if ok else ' NON-FINITE'}"
                                       for k, (ms, mb, ok) in res.items()), flush=True)
        del model, image
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print("| preset | backbone | SD | queries | params (M) | trainable (M) | "
          + " | ".join(f"{p} ms | {p} fwd peak MB" for p in precisions) + " |")
    print("|" + "---|" * (6 + 2 * len(precisions)))
    for name, bb, sd, q, params, trainable, res in rows:
        cells = " | ".join(f"{res[p][0]:.1f}{'' if res[p][2] else ' (non-finite!)'} | {res[p][1]:.0f}"
                           for p in precisions)
        print(f"| {name} | {bb} | {sd} | {q} | {params:.2f} | {trainable:.2f} | {cells} |")


if __name__ == "__main__":
    main()
