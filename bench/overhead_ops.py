"""Old vs new per-frame operations of the depth node, timed interleaved on the same arrays.

  .venv/bin/python bench/overhead_ops.py [--base REV] [--sizes 192x640 375x1242] [--reps 30]

The old code is the `--base` git revision of the same modules (loaded from `git show`), so the
comparison survives the machine being busy: each repetition times old then new back to back,
and the table prints medians, their ratio, and whether the outputs are byte-identical.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from std_msgs.msg import Header  # noqa: E402

from diffsql_model import inference as new_inference  # noqa: E402
from diffsql_model.colormaps import colorize_inverse_depth  # noqa: E402
from diffsql_ros import conversions as new_conversions, pointcloud as new_pointcloud  # noqa: E402

K = np.array([[721.5377, 0.0, 609.5593], [0.0, 721.5377, 172.854], [0.0, 0.0, 1.0]])


def load_old(rev: str, relpath: str, name: str):
    src = subprocess.run(["git", "show", f"{rev}:{relpath}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    # Relative imports of the old module resolve in today's package (only the module itself is old).
    mod.__package__ = os.path.dirname(relpath).replace("/", ".")
    sys.modules[name] = mod
    exec(compile(src, f"{rev}:{relpath}", "exec"), mod.__dict__)
    return mod


def old_colorizer(rev: str):
    """The node's depth colouring at `rev`: conversions.colorize_depth before colormaps.py existed."""
    try:
        return load_old(rev, "diffsql_model/colormaps.py", "old_colormaps").colorize_inverse_depth
    except subprocess.CalledProcessError:
        return load_old(rev, "diffsql_ros/conversions.py", "old_conversions_colour").colorize_depth


class FixedModel(torch.nn.Module):
    """Stands in for the network: the benchmark times what surrounds it."""

    def forward(self, x):  # x 1x3xhxw
        return {"depth": x[:, :1] * 80 + 0.5, "uncertainty": x[:, 1:2]}


class Cfg:
    height, width = 192, 640


def frame(h, w, seed=0):
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.05, 90, (h, w)).astype(np.float32)
    depth[(depth < 0.1) | (depth > 80)] = np.nan  # as the node leaves it (REP 118)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return depth, rgb


def same(a, b) -> bool:
    if isinstance(a, (bytes, bytearray, memoryview)) or type(a).__name__ == "array":
        return bytes(a) == bytes(b)
    if isinstance(a, tuple):
        return all(same(x, y) for x, y in zip(a, b))
    return bytes(np.ascontiguousarray(a).view(np.uint8)) == bytes(np.ascontiguousarray(b).view(np.uint8))


def cases(old, h, w):
    depth, rgb = frame(h, w)
    valid = (depth >= 0.0) & (depth <= 80.0)
    hdr = Header(frame_id="cam")
    ob, nb = old["pointcloud"].PointCloudBuilder(), new_pointcloud.PointCloudBuilder()
    oe = old["inference"].DepthEstimator(FixedModel(), Cfg())
    ne = new_inference.DepthEstimator(FixedModel(), Cfg())
    # The builders reuse their buffer: compare the bytes of each one's latest cloud.
    yield ("pointcloud rgb", lambda: ob.build(depth, K, hdr, valid, rgb).data,
           lambda: nb.build(depth, K, hdr, valid, rgb).data, None)
    yield ("pointcloud xyz", lambda: ob.build(depth, K, hdr, valid, None).data,
           lambda: nb.build(depth, K, hdr, valid, None).data, None)
    old_colorize = old_colorizer(old["rev"])
    yield ("colorize_depth", lambda: old_colorize(depth, 0.1, 80.0),
           lambda: colorize_inverse_depth(depth, 0.1, 80.0), None)

    unc = np.nan_to_num(depth) * 0.1
    yield ("array_to_image 32FC1", lambda: old["conversions"].array_to_image(unc, "32FC1", hdr).data,
           lambda: new_conversions.array_to_image(unc, "32FC1", hdr).data, None)

    def pre_post(est):
        out = est.predict(rgb)
        return out, est.timing

    yield ("inference pre+post", lambda: pre_post(oe), lambda: pre_post(ne), "timing")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 23d4b36~1: the code before the overhead work (commit 23d4b36).
    ap.add_argument("--base", default="23d4b36~1", help="git revision holding the old code")
    ap.add_argument("--sizes", nargs="+", default=["192x640", "375x1242"])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = {m: load_old(args.base, f"{pkg}/{m}.py", f"old_{m}") for pkg, m in
           (("diffsql_ros", "pointcloud"), ("diffsql_ros", "conversions"), ("diffsql_model", "inference"))}
    old["rev"] = args.base
    print(f"old = {args.base}, new = working tree; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          f"medians of {args.reps} interleaved runs (ms)")
    print(f"{'input':>9} | {'operation':<22} | {'old':>7} | {'new':>7} | {'new/old':>7} | identical")
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        for name, f_old, f_new, kind in cases(old, h, w):
            r_old, r_new = f_old(), f_new()
            if kind == "timing":  # the estimator's own preprocess + postprocess clocks
                ident = same(r_old[0], r_new[0])
                to, tn = [], []
                for _ in range(args.reps):
                    to.append(f_old()[1]), tn.append(f_new()[1])
                for part in ("preprocess_ms", "postprocess_ms"):
                    a, b = statistics.median(t[part] for t in to), statistics.median(t[part] for t in tn)
                    print(f"{size:>9} | {'inference ' + part[:-3]:<22} | {a:7.3f} | {b:7.3f} | {b / a:7.2f} | {ident}")
                continue
            ident = same(r_old, r_new)
            to, tn = [], []
            for _ in range(args.reps):
                t0 = time.perf_counter(); f_old(); t1 = time.perf_counter(); f_new(); t2 = time.perf_counter()
                to.append(t1 - t0), tn.append(t2 - t1)
            a, b = 1e3 * statistics.median(to), 1e3 * statistics.median(tn)
            print(f"{size:>9} | {name:<22} | {a:7.3f} | {b:7.3f} | {b / a:7.2f} | {ident}")


if __name__ == "__main__":
    main()
