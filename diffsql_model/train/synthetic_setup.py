"""`python -m diffsql_model.train.synthetic_setup OUT [--world W]`: write a synthetic training set
(several rendered drives in the KITTI layout plus one held-out drive with ground-truth depth, and
their split files; `diffsql_model.data.synthetic_kitti.make_synthetic_kitti`) and print the data.*
settings that `config/train/synthetic_lite.yaml` expects (root, train_split, val_split, depth_root).
"""
from __future__ import annotations

import argparse

from ..data.synthetic_kitti import make_synthetic_kitti
from ..data.synthetic_worlds import WORLDS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--drives", type=int, default=4)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--world", default="demo", choices=sorted(WORLDS),
                   help="generator setting the drives are drawn from (default: the demo's)")
    p.add_argument("--seed", type=int, default=0, help="first drive seed (validation drive: seed + 100)")
    a = p.parse_args(argv)
    paths = make_synthetic_kitti(a.out, tuple(range(a.seed, a.seed + a.drives)), val_seed=a.seed + 100,
                                 num_frames=a.frames, width=a.width, height=a.height, world=a.world)
    print(" ".join(f"--set data.{k}={v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
