"""Which uncertainty predicts the depth error? Sparsification of candidate maps, one table.

    .venv/bin/python bench/uncertainty_candidates.py --checkpoint CK [CK2 ...] --data S \\
        --split-file S/splits/test.txt --no-garg-crop            # the demo's held-out drive
    .venv/bin/python bench/uncertainty_candidates.py --checkpoint CK --protocol eigen \\
        --data ../shared/data/kitti --split-file kitti_velo.txt    # real KITTI frames

Candidates per checkpoint: `model` (its own `uncertainty` output: the bin std, or the trained
head's std), and the training-free `flip`: |d(x) - flip(d(flip(x)))| / 2, the std of the two
predictions (Poggi et al.'s "Post"; twice the network time). Each is ranked as published (std)
and relative (std / depth). AUSE / AURG for AbsRel as diffsql-eval --uncertainty computes them,
and the AbsRel of the pixels kept when 5 / 20 / 50 % are removed (points.max_uncertainty).
"calibration": mean |error| over mean std / sqrt(2), median-scaled, on the valid pixels: 1 when
the published std in metres is a Laplacian's (E|e| = std / sqrt(2)), > 1 when it is too small.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffsql_model.data.network_input import to_tensor_resized  # noqa: E402
from diffsql_model.eval import metrics, protocols  # noqa: E402
from diffsql_model.eval.cli import CheckpointNet, build_frames  # noqa: E402

KEPT = (0.05, 0.2, 0.5)  # fractions removed: 95 / 80 / 50 % kept


def candidate_maps(net: CheckpointNet, image: np.ndarray) -> tuple[np.ndarray, dict]:
    """One frame -> (depth, {candidate: std map}) at the network size."""
    x = to_tensor_resized(image, net.cfg.height, net.cfg.width)
    (d, u), (d_flip, _) = net(torch.stack([x, x.flip(-1)]))
    return d, {"model": u, "flip": np.abs(d - d_flip[:, ::-1]) / 2 + 1e-6}


def calibration(frames, maps: list, cfg) -> float:
    """mean |scaled depth - gt| / mean(std / sqrt 2) over every frame's valid pixels."""
    err, spread = 0.0, 0.0
    for f, (d, u) in zip(frames, maps):
        gt = f.load_gt()
        valid = np.isfinite(gt) & (gt > cfg.min_depth) & (gt < cfg.max_depth)
        if cfg.garg_crop:
            valid &= metrics.garg_crop_mask(*gt.shape)
        d = metrics.resize_prediction(d, *gt.shape)[valid]
        ratio = metrics.median_scale(gt[valid], d)
        err += float(np.abs(d * ratio - gt[valid]).sum())
        spread += float((metrics.resize_prediction(u, *gt.shape)[valid] * ratio).sum()) / np.sqrt(2)
    return err / spread


def kept_abs_rel(unc: dict, ranking: str) -> list[float]:
    f = np.asarray(unc["fractions"])
    curve = np.asarray(unc[ranking]["abs_rel"]["curve"])
    return [float(np.interp(k, f, curve)) for k in KEPT]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", nargs="+", required=True, type=pathlib.Path)
    ap.add_argument("--protocol", default="eigen_benchmark", choices=("eigen", "eigen_benchmark"))
    ap.add_argument("--data", required=True, type=pathlib.Path)
    ap.add_argument("--split-file", required=True, type=pathlib.Path)
    ap.add_argument("--no-garg-crop", dest="garg_crop", action="store_false")
    ap.add_argument("--gt-depth", default="velo_x")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    frames, details = build_frames(args)
    crop = {} if args.garg_crop else {"garg_crop": False}
    cfg = protocols.EvalConfig.for_protocol(args.protocol, gt_depth=args.gt_depth, **crop)
    print("| checkpoint | uncertainty | AbsRel | candidate | ranked by | AbsRel AUSE | AbsRel AURG | "
          "AbsRel kept 95 / 80 / 50 % | calibration |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ck in args.checkpoint:
        net = CheckpointNet(ck, "cpu", uncertainty=True, max_batch=2)
        maps = [candidate_maps(net, f.load_image()) for f in frames]
        for name in ("model", "flip"):
            pairs = [(d, c[name]) for d, c in maps]
            res = protocols.run_evaluation(frames, pairs, cfg, **details)
            unc, cal = res["uncertainty"], calibration(frames, pairs, cfg)
            for ranking, label in (("std", "std"), ("std_over_depth", "std/depth")):
                a = unc[ranking]["abs_rel"]
                kept = " / ".join(f"{v:.3f}" for v in kept_abs_rel(unc, ranking))
                print(f"| {ck} | {net.cfg.uncertainty} | {res['metrics']['abs_rel']:.3f} | {name} | {label} | "
                      f"{a['ause']:.3f} | {a['aurg']:+.3f} | {kept} | {cal:.2f} |", flush=True)
        oracle = unc["std"]["abs_rel"]
        print(f"| {ck} | | | oracle | | 0 | {oracle['aurg'] + oracle['ause']:+.3f} | "
              + " / ".join(f"{float(np.interp(k, unc['fractions'], oracle['oracle'])):.3f}" for k in KEPT) + " | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
