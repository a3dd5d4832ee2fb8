"""`diffsql-make-sample`: the embedded sample of `make demo`, built offline in about a minute.

  diffsql-make-sample --out demo_out/sample --shared ../shared

Writes under OUT:
  synthetic/raw/<date>/<drive>/...      procedural drives in the KITTI raw layout (train drives,
  synthetic/depth/train/<drive>/...     one validation drive, one held-out test drive) with
  synthetic/splits/{train,val,test}.txt exact depth PNGs and LiDAR-like scans
  bags/synthetic_test_mcap/             the held-out test drive as a ROS 2 (mcap) bag:
                                        image, camera_info, LiDAR, /tf_static
  bags/kitti_2011_09_26_0001.bag        the real KITTI frames of ../shared/data/kitti (images,
                                        camera_info, velodyne scans) as a ROS 1 bag, kitti2bag names
  sample.json                           what was built, with which settings
A second run with the same settings reuses everything (sample.json records them); --force rebuilds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
import time

from diffsql_model.data.bag_writer import FRAME_IDS, BagFrame, kitti_drive_to_bag, write_bag
from diffsql_model.data.synthetic import SyntheticConfig, render_drive
from diffsql_model.data.synthetic_kitti import DATE, make_synthetic_kitti, points_lidar, write_kitti_layout, write_split

BASE_STAMP_S = 1_300_000_000  # recorded stamps of the synthetic bag start here (not at 0)
KITTI_DATE, KITTI_DRIVE = "2011_09_26", "0001"
TEST_DRIVE = f"{DATE}_drive_0200_sync"
TEST_SEED_OFFSET = 200  # the held-out drive's scene differs from every training / validation scene


@dataclasses.dataclass
class SampleSettings:
    width: int = 320
    height: int = 96
    train_drives: int = 12
    train_frames: int = 24  # per training drive (left and right images are both used)
    val_frames: int = 8
    test_frames: int = 20
    bag_format: str = "mcap"  # synthetic test bag: ros1 | sqlite3 | mcap
    seed: int = 0


def synthetic_drive_to_bag(drive, path: pathlib.Path, fmt: str) -> pathlib.Path:
    """A rendered drive -> bag: left image + camera_info, LiDAR-like scan, /tf_static (camera <- LiDAR)."""

    def frames():
        for i in range(len(drive.rgb)):
            yield BagFrame(stamp_ns=int(round((BASE_STAMP_S + float(drive.stamps[i])) * 1e9)),
                           rgb=drive.rgb[i], K=drive.K,
                           points=points_lidar(drive.depth[i], drive.K, drive.T_velo_to_cam, drive.rgb[i]))

    tf = [(FRAME_IDS["camera"], FRAME_IDS["lidar"], drive.T_velo_to_cam)]  # X_cam = T X_velo
    return write_bag(path, frames(), fmt, static_transforms=tf)


def build_synthetic(out: pathlib.Path, s: SampleSettings, log=print) -> dict:
    """Training + validation drives exactly as `make_synthetic_kitti` makes them (what
    config/train/synthetic_lite.yaml is tuned on), plus a held-out test drive (own seed) with
    its split file and bag."""
    root = out / "synthetic"
    t = time.monotonic()
    data = make_synthetic_kitti(root, train_seeds=tuple(s.seed + i for i in range(s.train_drives)),
                                val_seed=s.seed + 100, num_frames=s.train_frames, width=s.width,
                                height=s.height, val_frames=s.val_frames)
    log(f"  synthetic training set: {s.train_drives} drives x {s.train_frames} frames + "
        f"{s.val_frames} validation frames, {s.width}x{s.height} ({time.monotonic() - t:.1f} s)")
    t = time.monotonic()
    test = render_drive(SyntheticConfig(width=s.width, height=s.height, num_frames=s.test_frames,
                                        seed=s.seed + TEST_SEED_OFFSET))
    write_kitti_layout(test, root, DATE, TEST_DRIVE)
    test_split = root / "splits" / "test.txt"
    write_split(test_split, DATE, TEST_DRIVE, range(s.test_frames))
    suffix = ".bag" if s.bag_format == "ros1" else f"_{s.bag_format}"
    bag = synthetic_drive_to_bag(test, out / "bags" / f"synthetic_test{suffix}", s.bag_format)
    log(f"  held-out test drive {TEST_DRIVE}: {s.test_frames} frames + bag {bag} ({time.monotonic() - t:.1f} s)")
    frames = {name: sum(1 for ln in pathlib.Path(p).read_text().splitlines() if ln.strip())
              for name, p in (("train", data["train_split"]), ("val", data["val_split"]), ("test", test_split))}
    return {"data": data, "root": str(root), "test_split": str(test_split), "test_drive": TEST_DRIVE,
            "frames": frames, "test_bag": str(bag)}


def build_kitti_bag(out: pathlib.Path, shared: pathlib.Path, log=print) -> dict:
    raw = shared / "data" / "kitti" / "raw"
    if not (raw / KITTI_DATE).is_dir():
        raise FileNotFoundError(f"real KITTI sample not found under {raw} (pass --shared)")
    bag = out / "bags" / f"kitti_{KITTI_DATE}_{KITTI_DRIVE}.bag"
    kitti_drive_to_bag(raw, KITTI_DATE, KITTI_DRIVE, bag, fmt="ros1")
    log(f"  KITTI bag: {bag}")
    return {"bag": str(bag), "source": str(raw / KITTI_DATE / f"{KITTI_DATE}_drive_{KITTI_DRIVE}_sync")}


def make_sample(out: str | pathlib.Path, shared: str | pathlib.Path, settings: SampleSettings | None = None,
                force: bool = False, log=print) -> dict:
    """Build (or reuse) the sample under `out`; returns the manifest (also in out/sample.json)."""
    out, shared = pathlib.Path(out), pathlib.Path(shared)
    s = settings or SampleSettings()
    manifest_path = out / "sample.json"
    if manifest_path.is_file() and not force:
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("settings") == dataclasses.asdict(s) and old.get("complete"):
            log(f"sample: reusing {out}")
            return old
    if not (shared / "data" / "kitti" / "raw" / KITTI_DATE).is_dir():  # fail before any work
        raise FileNotFoundError(f"real KITTI sample not found under {shared / 'data' / 'kitti' / 'raw'} (pass --shared)")
    t0 = time.monotonic()
    for sub in ("synthetic", "bags"):
        shutil.rmtree(out / sub, ignore_errors=True)  # a half-built sample is never reused
    manifest_path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"settings": dataclasses.asdict(s), "synthetic": build_synthetic(out, s, log),
                "kitti": build_kitti_bag(out, shared, log)}
    manifest["build_s"] = round(time.monotonic() - t0, 1)
    manifest["complete"] = True
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"sample built in {manifest['build_s']} s: {manifest_path}")
    return manifest


def main(argv=None) -> int:
    d = SampleSettings()
    ap = argparse.ArgumentParser(prog="diffsql-make-sample", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--shared", type=pathlib.Path, default=pathlib.Path("../shared"),
                    help="folder holding data/kitti (the real KITTI frames)")
    for f in dataclasses.fields(SampleSettings):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)), default=getattr(d, f.name))
    ap.add_argument("--force", action="store_true", help="rebuild even if a matching sample exists")
    args = ap.parse_args(argv)
    settings = SampleSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SampleSettings)})
    if settings.bag_format not in ("ros1", "sqlite3", "mcap"):
        ap.error("--bag-format must be ros1, sqlite3 or mcap")
    try:
        make_sample(args.out, args.shared, settings, args.force)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        print(f"diffsql-make-sample: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
