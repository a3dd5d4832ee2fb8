"""KITTI raw training dataset (Monodepth2 / SQLdepth layout and split lines).

Layout: `<root>/<date>/<drive>/image_02|image_03/data/<frame:010d>.png|jpg`, calibration in
`<root>/<date>/calib_*.txt`. Split lines: `<date>/<drive> <frame> l|r`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
import torch

from diffsql_model.data.augment import (
    AugmentConfig,
    build_sample,
    draw_augmentation,
    normalised_kitti_K,
)
from diffsql_model.data.calib import load_kitti_calib, stereo_baseline
from diffsql_model.data.ground_truth import (MissingGroundTruth, kitti_velodyne_path, read_velodyne_bin,
                                             velodyne_depth_map)
from diffsql_model.data.images import load_rgb

log = logging.getLogger(__name__)

SIDE_TO_CAM = {"l": 2, "r": 3}
KITTI_BASELINE_M = 0.54  # used only when use_calib=False


class KittiDataError(FileNotFoundError):
    """Split lines whose images are missing, or malformed split lines."""


def parse_split_lines(lines: Iterable[str], source: str = "split") -> list[tuple[str, int, str]]:
    """`<date>/<drive> <frame> l|r` lines -> (folder, frame, side); blank lines are skipped."""
    out = []
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or parts[2] not in SIDE_TO_CAM or not parts[1].lstrip("-").isdigit():
            raise KittiDataError(f"{source}:{n}: expected '<date>/<drive> <frame> l|r', got {line!r}")
        out.append((parts[0], int(parts[1]), parts[2]))
    return out


def read_kitti_timestamps(path: str | pathlib.Path) -> list[int]:
    """KITTI `timestamps.txt` (`2011-09-26 13:02:25.961661696` a line) -> ns since the epoch (UTC)."""
    out = []
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        day, _, frac = line.partition(".")
        secs = np.datetime64(day.replace(" ", "T"), "s").astype(np.int64)
        out.append(int(secs) * 1_000_000_000 + int((frac + "000000000")[:9]))
    return out


@dataclasses.dataclass(frozen=True)
class SplitLine:
    folder: str  # "<date>/<date>_drive_<n>_sync"
    frame: int
    side: str  # "l" (image_02) or "r" (image_03)

    @property
    def cam(self) -> int:
        return 2 if self.side == "l" else 3

    def __str__(self) -> str:
        return f"{self.folder} {self.frame} {self.side}"


def read_split_file(path: str | pathlib.Path) -> list[SplitLine]:
    """`<date>/<drive> <frame> <l|r>` lines (blank lines skipped; the training loader's parser);
    a bad line or an empty file is an error."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    lines = [SplitLine(*line) for line in parse_split_lines(path.read_text().splitlines(), str(path))]
    if not lines:
        raise ValueError(f"split file {path} lists no frames")
    return lines


def benchmark_gt_path(depth_root: pathlib.Path, line: SplitLine) -> pathlib.Path:
    """The improved ground truth of a split line, looked up in depth/train then depth/val."""
    drive = line.folder.rstrip("/").split("/")[-1]
    rel = pathlib.Path(drive, "proj_depth", "groundtruth", f"image_0{line.cam}", f"{line.frame:010d}.png")
    candidates = [depth_root / sub / rel for sub in ("train", "val")]
    for path in candidates:
        if path.is_file():
            return path
    raise MissingGroundTruth(f"no improved ground truth at {candidates[0]} or {candidates[1]}")


class KittiRawDataset(torch.utils.data.Dataset):
    """Training / validation samples from KITTI raw (see docs/interfaces.md for the dict).

    split: a split file path or a list of split lines. frame_ids: temporal offsets
    (0, -1, 1) plus "s" for the stereo partner. on_missing: "error" (default) raises naming
    every missing file; "drop" removes those lines and lists them in `self.dropped`
    (and logs a warning with the count).
    """

    def __init__(
        self,
        root: str | pathlib.Path,
        split: str | pathlib.Path | Sequence[str],
        height: int = 192,
        width: int = 640,
        frame_ids: Sequence = (0, -1, 1),
        stereo: bool = False,
        is_train: bool = True,
        image_ext: str = "auto",
        use_calib: bool = True,
        on_missing: str = "error",
        load_depth: bool = False,
        depth_definition: str = "velo_x",
        augment: AugmentConfig | None = None,
    ):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise KittiDataError(f"KITTI raw root not found: {self.root}")
        if isinstance(split, (str, pathlib.Path)):
            split_path = pathlib.Path(split)
            if not split_path.is_file():
                raise KittiDataError(f"split file not found: {split_path}")
            self.lines = parse_split_lines(split_path.read_text().splitlines(), str(split_path))
        else:
            self.lines = parse_split_lines(split)
        self.frame_ids = list(frame_ids)
        if stereo and "s" not in self.frame_ids:
            self.frame_ids.append("s")
        if on_missing not in ("error", "drop"):
            raise ValueError(f"on_missing must be 'error' or 'drop', got {on_missing!r}")
        if image_ext not in ("auto", "png", "jpg"):
            raise ValueError(f"image_ext must be 'auto', 'png' or 'jpg', got {image_ext!r}")
        self.height, self.width = height, width
        self.is_train = is_train
        self.image_ext = image_ext
        self.use_calib = use_calib
        self.load_depth = load_depth
        self.depth_definition = depth_definition
        self.augment = augment or AugmentConfig()
        self._calib_cache: dict = {}
        self._baseline_cache: dict = {}
        self._stamp_cache: dict = {}
        self._listings: dict = {}
        self._root_str = str(self.root)
        self.dropped: list[tuple[str, list[str]]] = []
        self._check_files(on_missing)
        self._listings = {}  # rebuilt lazily per worker by __getitem__ (image_ext="auto")

    # -- files ---------------------------------------------------------------------------
    def _exists(self, path: str) -> bool:
        """File test through one cached listing per folder (a split has ~40k lines; plain
        strings because pathlib costs seconds here)."""
        folder, name = os.path.split(path)
        if folder not in self._listings:
            self._listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        return name in self._listings[folder]

    def _frame_path(self, folder: str, frame: int, side: str) -> str:
        base = f"{self._root_str}/{folder}/image_0{SIDE_TO_CAM[side]}/data/{frame:010d}"
        if self.image_ext != "auto":
            return f"{base}.{self.image_ext}"
        return f"{base}.png" if self._exists(f"{base}.png") or not self._exists(f"{base}.jpg") else f"{base}.jpg"

    def _needed(self, folder: str, frame: int, side: str) -> dict:
        """frame id -> (path, side) for one split line."""
        other = "r" if side == "l" else "l"
        out = {}
        for fid in self.frame_ids:
            if fid == "s":
                out[fid] = (self._frame_path(folder, frame, other), other)
            else:
                out[fid] = (self._frame_path(folder, frame + int(fid), side), side)
        return out

    def _check_files(self, on_missing: str) -> None:
        keep, problems = [], []
        for folder, frame, side in self.lines:
            missing = [str(p) for p, _ in self._needed(folder, frame, side).values() if not self._exists(p)]
            if self.load_depth:
                scan = f"{self._root_str}/{folder}/velodyne_points/data/{frame:010d}.bin"
                if not self._exists(scan):
                    missing.append(scan)
            if self.use_calib:
                for name in ("calib_cam_to_cam.txt", "calib_velo_to_cam.txt"):
                    p = f"{self._root_str}/{folder.split('/')[0]}/{name}"
                    if not self._exists(p):
                        missing.append(str(p))
            if missing:
                problems.append((f"{folder} {frame} {side}", missing))
            else:
                keep.append((folder, frame, side))
        if problems and on_missing == "error":
            shown = "\n".join(f"  {line}: missing {', '.join(m)}" for line, m in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more lines" if len(problems) > 20 else ""
            raise KittiDataError(
                f"{len(problems)} of {len(self.lines)} split lines lack files under {self.root} "
                f"(pass on_missing='drop' to skip them):\n{shown}{more}"
            )
        if problems:
            log.warning("KittiRawDataset: dropped %d of %d split lines with missing files (see .dropped)",
                        len(problems), len(self.lines))
        self.dropped = problems
        self.lines = keep

    def _calib(self, date: str, cam: int):
        key = (date, cam)
        if key not in self._calib_cache:
            self._calib_cache[key] = load_kitti_calib(self.root / date, cam)
        return self._calib_cache[key]

    def _baseline(self, date: str) -> float:
        """Stereo baseline of a date, read once (it parses both cameras' calibration)."""
        if date not in self._baseline_cache:
            self._baseline_cache[date] = stereo_baseline(self.root / date)
        return self._baseline_cache[date]

    # -- samples -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> dict:
        folder, frame, side = self.lines[index]
        date = folder.split("/")[0]
        images = {fid: load_rgb(pathlib.Path(path)) for fid, (path, _) in self._needed(folder, frame, side).items()}
        h0, w0 = images[0].shape[:2]
        baseline, K_size = None, None
        if self.use_calib:
            calib = self._calib(date, SIDE_TO_CAM[side])
            K = calib.K
            if "s" in images:
                baseline = self._baseline(date)
        else:
            K_size = (self.width, self.height)  # the published K is defined at the network size
            K = normalised_kitti_K(*K_size)
            baseline = KITTI_BASELINE_M
        draw = draw_augmentation(self.augment, self.is_train)
        sample = build_sample(images, K, self.height, self.width, draw, baseline,
                              side_sign=-1.0 if side == "l" else 1.0, K_size=K_size)
        if self.load_depth:
            sample["depth_gt"] = self._depth(folder, frame, side, (w0, h0), draw.flip)
        sample["index"] = index
        sample["name"] = f"{folder} {frame:010d} {side}"
        sample["stamp"] = self._stamp(folder, frame, side)
        return sample

    def _stamp(self, folder: str, frame: int, side: str) -> int:
        """Capture time in ns from the drive's timestamps.txt; -1 where the file lacks it."""
        key = (folder, side)
        if key not in self._stamp_cache:
            path = self.root / folder / f"image_0{SIDE_TO_CAM[side]}" / "timestamps.txt"
            self._stamp_cache[key] = read_kitti_timestamps(path) if path.is_file() else []
        stamps = self._stamp_cache[key]
        return stamps[frame] if 0 <= frame < len(stamps) else -1

    def _depth(self, folder: str, frame: int, side: str, size, flip: bool) -> torch.Tensor:
        calib = self._calib(folder.split("/")[0], SIDE_TO_CAM[side])
        points = read_velodyne_bin(kitti_velodyne_path(self.root, folder, frame))
        depth = velodyne_depth_map(points, calib, size, self.depth_definition)
        if flip:
            depth = depth[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(depth))[None]
