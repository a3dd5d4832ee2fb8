"""Synthetic training set for CPU demos and the "it learns" test: several rendered drives in the
KITTI layout plus one held-out drive with ground-truth depth, and their split files.

`python -m diffsql_model.train.synthetic_setup OUT` writes it and prints the data.* settings
that `config/train/synthetic_lite.yaml` expects (root, train_split, val_split, depth_root).
"""
from __future__ import annotations

import argparse
import pathlib

DATE = "2011_01_01"


def make_synthetic_kitti(root: str | pathlib.Path, train_seeds=(0, 1, 2, 3), val_seed: int = 100,
                         num_frames: int = 24, width: int = 320, height: int = 96,
                         val_frames: int = 8) -> dict[str, str]:
    """Render `train_seeds` drives (all inner frames are training triplet centres, left and right
    camera) and the held-out drive `val_seed` (its first `val_frames` frames are validation
    frames). Returns the DataConfig fields: root, train_split, val_split, depth_root."""
    from ..data.synthetic import SyntheticConfig, render_drive
    from ..data.synthetic_kitti import write_kitti_layout, write_split

    root = pathlib.Path(root)
    train_lines = []
    for i, seed in enumerate(train_seeds):
        name = f"{DATE}_drive_{i + 1:04d}_sync"
        drive = render_drive(SyntheticConfig(width=width, height=height, num_frames=num_frames, seed=seed))
        write_kitti_layout(drive, root, DATE, name)
        train_lines += [f"{DATE}/{name} {f} {side}\n" for f in range(1, num_frames - 1) for side in "lr"]
    val_name = f"{DATE}_drive_0999_sync"
    drive = render_drive(SyntheticConfig(width=width, height=height, num_frames=max(val_frames, 2), seed=val_seed))
    write_kitti_layout(drive, root, DATE, val_name)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "train.txt").write_text("".join(train_lines))
    write_split(root / "splits" / "val.txt", DATE, val_name, range(val_frames))
    return {"root": str(root / "raw"), "train_split": str(root / "splits" / "train.txt"),
            "val_split": str(root / "splits" / "val.txt"), "depth_root": str(root / "depth")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--drives", type=int, default=4)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=96)
    a = p.parse_args(argv)
    paths = make_synthetic_kitti(a.out, tuple(range(a.drives)), num_frames=a.frames,
                                 width=a.width, height=a.height)
    print(" ".join(f"--set data.{k}={v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
