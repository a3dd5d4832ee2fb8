"""DepthNet speed per preset: parameters, forward latency (median), FPS, peak memory, per precision.

    python bench/model_speed.py                      # all presets, CPU, tiny SD, 192x640
    python bench/model_speed.py --device cuda --sd-arch v1.5 --runs 10 --precisions fp32 fp16 bf16
Weights are random (speed does not depend on them); full-size SD presets set
sd.allow_random_weights. SD presets use the tiny SD on CPU unless --sd-arch v1.5 is given. Each
precision builds its own model as the node loads it: frozen SD in the precision's dtypes
(device.sd_dtypes), the rest fp32 under autocast; on CUDA with the node's math settings (cuDNN
autotuning, TF32 unless --no-tf32). Latency: wall time of one forward, the GPU synchronised
before and after. Peak memory: CUDA allocator peak on GPU; on CPU the rise of the
process's peak RSS (VmHWM, reset before the timed runs) over its RSS before them, with
glibc's mmap threshold fixed so freed tensors leave RSS: activation memory of one forward.
Prints a markdown table last; --json writes the rows for bench/gpu_table.py.

    python bench/model_speed.py --presets lite --precisions fp32 --runtime eager compile onnxruntime tensorrt
--runtime: one row per preset, precision and inference runtime (diffsql_model/runtimes.py) instead:
start (build / export / engine build and the first call, which compiles), median latency, FPS,
peak memory and the max |depth difference| to eager in the same precision on the same random
image. Runtimes that cannot run here (tensorrt without CUDA or torch_tensorrt, onnxruntime in
bf16) are skipped with a line saying why. Exports and engines go to a fresh temporary cache
unless --cache-dir is given (then a second run shows the cached start).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from diffsql_model.depth_net import DiffSQLDepth  # noqa: E402
from diffsql_model.inference import cuda_math_mode  # noqa: E402
from diffsql_model.presets import PRESETS, get_preset  # noqa: E402
from diffsql_model.runtimes import RUNTIMES, RuntimeUnavailable, build_runtime, depth_maps  # noqa: E402


try:
    _LIBC = ctypes.CDLL("libc.so.6")  # glibc: malloc_trim
except OSError:
    _LIBC = None


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
            # Hand freed memory back to the OS first, so the forward's peak shows in RSS. (A fixed
            # MALLOC_MMAP_THRESHOLD_ did that for every forward, and doubled eager CPU latency.)
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
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


def timed(forward, device, runs):
    """forward() once to warm up (cuDNN autotuning, compilation, one-time allocations stay
    outside), then `runs` times: (median ms, peak memory rise MB, the warm-up's output)."""
    out = forward()
    with PeakMemory(device) as mem:  # one forward on its own: timed runs keep the allocator's cache
        forward()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        forward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a benchmark: the wall time of the whole forward
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), mem.mb, out


def measure(model, image, device, dtype, runs, tf32=True):
    """Median forward latency (ms) and peak memory rise (MB) under autocast(dtype) or fp32."""
    cuda = device.type == "cuda"

    def forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), \
                cuda_math_mode(tf32) if cuda else contextlib.nullcontext():
            return model(image)

    ms, mb, out = timed(forward, device, runs)
    ok = all(torch.isfinite(v.float()).all() for v in out.values())
    return ms, mb, ok


def preset_config(name, args, sd_arch):
    cfg = get_preset(name, weights="none", height=args.height, width=args.width)
    if cfg.sd.enabled:
        cfg = dataclasses.replace(cfg, sd=dataclasses.replace(cfg.sd, arch=sd_arch or cfg.sd.arch,
                                                              allow_random_weights=True))
    return cfg


def bench_preset(name, args, device, precisions, sd_arch) -> dict:
    """One preset: a model per precision (frozen SD in that precision's dtypes), same weights."""
    cfg = preset_config(name, args, sd_arch)
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    image = torch.rand(args.batch, 3, args.height, args.width, device=device)
    res = {}
    for p in precisions:
        torch.manual_seed(0)
        model = DiffSQLDepth.from_config(cfg, device, precision=p).eval()
        params = sum(t.numel() for t in model.parameters()) / 1e6
        trainable = sum(t.numel() for t in model.parameters() if t.requires_grad) / 1e6
        res[p] = measure(model, image, device, dtypes[p], args.runs, not args.no_tf32)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sd = f"{cfg.sd.arch}/{cfg.sd.layer}" if cfg.sd.enabled else "off"
    return {"preset": name, "backbone": cfg.backbone, "sd": sd, "queries": cfg.query_mode,
            "params_M": params, "trainable_M": trainable, "batch": args.batch,
            "results": {p: {"ms": ms, "fps": 1e3 * args.batch / ms, "peak_MB": mb, "finite": bool(ok)}
                        for p, (ms, mb, ok) in res.items()}}


def bench_runtimes(name, args, device, precisions, sd_arch, cache_dir) -> list[dict]:
    """One preset: per precision a model (as bench_preset), then each runtime of it against
    eager in that precision on one random image."""
    cfg = preset_config(name, args, sd_arch)
    size, cuda = (args.height, args.width), device.type == "cuda"
    image = torch.rand(args.batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    math = (lambda: cuda_math_mode(not args.no_tf32)) if cuda else contextlib.nullcontext
    rows = []
    for p in precisions:
        torch.manual_seed(0)
        model = DiffSQLDepth.from_config(cfg, device, precision=p).eval()
        with torch.inference_mode(), math():
            ref = depth_maps(model, image, p, uncertainty=True)
        for rt in args.runtime:
            row = {"preset": name, "precision": p, "runtime": rt, "batch": args.batch}
            rows.append(row)
            start = time.perf_counter()
            try:
                runtime = build_runtime(model, rt, size, p, device, max_batch=args.batch,
                                        cache_dir=cache_dir, tf32=not args.no_tf32)
            except RuntimeUnavailable as e:
                row["skipped"] = str(e)
                print(f"{name} {p} {rt}: skipped: {e}", flush=True)
                continue

            def forward():
                with torch.inference_mode(), math():
                    return runtime(image)

            forward()  # the first call compiles (torch.compile) or allocates (engines, arenas)
            row["start_s"] = time.perf_counter() - start
            ms, mb, out = timed(forward, device, args.runs)
            err = float((out[:, 0] - ref[:, 0]).abs().max())
            row.update(ms=ms, fps=1e3 * args.batch / ms, peak_MB=mb, max_depth_err_m=err,
                       from_cache=runtime.from_cache)
            print(f"{name} {p} {rt}: start {row['start_s']:.1f} s, {ms:.1f} ms, {mb:.0f} MB, "
                  f"max |depth - eager| {err:.2e} m", flush=True)
        del model
        gc.collect()
    return rows


def print_runtime_table(rows):
    print("| preset | precision | runtime | start s | ms | FPS | peak MB | max abs depth err vs eager (m) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['preset']} | {r['precision']} | {r['runtime']} | skipped (below) | | | | |")
            continue
        cached = " (cached)" if r["from_cache"] else ""
        print(f"| {r['preset']} | {r['precision']} | {r['runtime']} | {r['start_s']:.1f}{cached} | "
              f"{r['ms']:.1f} | {r['fps']:.1f} | {r['peak_MB']:.0f} | {r['max_depth_err_m']:.1e} |")
    for r in rows:
        if "skipped" in r:
            print(f"\n{r['preset']} {r['precision']} {r['runtime']} skipped: {r['skipped']}")


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
    ap.add_argument("--no-tf32", action="store_true", help="CUDA: IEEE fp32 matmuls and convolutions")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--runtime", nargs="+", choices=RUNTIMES, default=None,
                    help="compare these inference runtimes instead (one row per preset, precision, runtime)")
    ap.add_argument("--cache-dir", default=None, help="--runtime: export / engine cache (default: a fresh temp dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = args.precisions or ["fp32", "bf16"]
    if device.type == "cpu" and "fp16" in precisions:
        ap.error("fp16 autocast is a CUDA path (CPU half convolutions are slow or missing)")
    sd_arch = args.sd_arch or ("tiny" if device.type == "cpu" else None)
    if device.type == "cuda":
        name_dev = f"{torch.cuda.get_device_name(device)}, TF32 {'off' if args.no_tf32 else 'on'}"
    else:
        name_dev = f"CPU, {args.threads} threads"
    print(f"# DepthNet forward, {args.batch} x 3 x {args.height} x {args.width}, {name_dev}, "
          f"median of {args.runs} runs, torch {torch.__version__}", flush=True)
    if args.runtime:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [r for name in args.presets
                    for r in bench_runtimes(name, args, device, precisions, sd_arch, args.cache_dir or tmp)]
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({"meta": {"device": name_dev}, "runtime_rows": rows}, indent=1))
        print()
        print_runtime_table(rows)
        return
    rows = []
    for name in args.presets:
        row = bench_preset(name, args, device, precisions, sd_arch)
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{p} {r['ms']:.1f} ms {r['peak_MB']:.0f} MB"
                                       f"{'' if r['finite'] else ' NON-FINITE'}"
                                       for p, r in row["results"].items()), flush=True)
    if args.json:
        meta = {"device": name_dev, "height": args.height, "width": args.width, "runs": args.runs,
                "torch": torch.__version__}
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print()
    print("| preset | backbone | SD | queries | params (M) | trainable (M) | "
          + " | ".join(f"{p} ms | {p} FPS | {p} fwd peak MB" for p in precisions) + " |")
    print("|" + "---|" * (6 + 3 * len(precisions)))
    for row in rows:
        res = row["results"]
        cells = " | ".join(f"{res[p]['ms']:.1f}{'' if res[p]['finite'] else ' (non-finite!)'} | "
                           f"{res[p]['fps']:.1f} | {res[p]['peak_MB']:.0f}" for p in precisions)
        print(f"| {row['preset']} | {row['backbone']} | {row['sd']} | {row['queries']} | "
              f"{row['params_M']:.2f} | {row['trainable_M']:.2f} | {cells} |")

if __name__ == "__main__":
    main()
