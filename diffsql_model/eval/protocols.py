"""Evaluation protocols (shared PROTOCOLS.md): which frames, which ground truth, which mask.

`eigen` (velodyne scans), `eigen_benchmark` (improved ground-truth PNGs), `make3d` and `bag`
(image + LiDAR depth maps already paired by `diffsql_model.data.lidar.LidarDepth`). Every protocol turns
into a list of `Frame`s evaluated by `run_evaluation` against a sequence of predictions (one
H x W depth map in metres per frame, any resolution). Frames without ground truth are listed
under "missing" in the result, never dropped silently.

Accepted KITTI layouts (`resolve_kitti_data`): a root holding `raw/` and/or `depth/`
(`raw/<date>/<date>_drive_<n>_sync/...`, `depth/{train,val}/<drive>/proj_depth/groundtruth/
image_0{2,3}/<frame:010d>.png`), a raw-only folder (`<date>/...`), or the depth folder itself.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Iterable, Sequence

import numpy as np

from diffsql_model.data import ground_truth as gtlib
from diffsql_model.data import make3d as m3d
from diffsql_model.data.calib import load_kitti_calib
from diffsql_model.data.images import load_rgb
from diffsql_model.data.kitti import SplitLine, benchmark_gt_path
from diffsql_model.eval import metrics, scale_stability, sparsification
from diffsql_model.yaml_config import ConfigError, YamlConfig

PROTOCOLS = ("eigen", "eigen_benchmark", "make3d", "bag")
# the depth definition of each protocol's ground truth (eigen: EvalConfig.gt_depth)
GT_DEPTH = {"eigen_benchmark": "kitti_depth_png (camera z)", "make3d": "make3d_laser_range", "bag": "lidar"}


@dataclasses.dataclass
class EvalConfig(YamlConfig):
    """Ground-truth validity, scaling and clipping of one evaluation run."""

    protocol: str = "eigen"
    min_depth: float = 1e-3  # valid ground truth: min_depth < gt < max_depth
    max_depth: float = 80.0
    clip_min: float = 1e-3  # scaled predictions are clipped to [clip_min, clip_max]
    clip_max: float = 80.0
    scaling: str = "median"  # "median" (per image) or "fixed" (metric models: pred * scale)
    scale: float = 1.0
    gt_depth: str = "velo_x"  # eigen only: "velo_x" (standard) or "cam_z"
    garg_crop: bool = True

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.scaling not in ("median", "fixed"):
            raise ConfigError(f"scaling must be 'median' or 'fixed', got {self.scaling!r}")
        if self.gt_depth not in gtlib.DEPTH_DEFINITIONS:
            raise ConfigError(f"gt_depth must be one of {gtlib.DEPTH_DEFINITIONS}, got {self.gt_depth!r}")
        if not (0 <= self.min_depth < self.max_depth and 0 < self.clip_min < self.clip_max):
            raise ConfigError("need 0 <= min_depth < max_depth and 0 < clip_min < clip_max")
        if self.scaling == "fixed" and not self.scale > 0:
            raise ConfigError(f"fixed scaling needs scale > 0, got {self.scale}")

    @classmethod
    def for_protocol(cls, protocol: str, **overrides) -> "EvalConfig":
        """Protocol defaults: make3d keeps gt < 70 m and no Garg crop; bag no Garg crop."""
        base = {"make3d": {"max_depth": 70.0, "garg_crop": False}, "bag": {"garg_crop": False}}
        return cls(protocol=protocol, **{**base.get(protocol, {}), **overrides})


@dataclasses.dataclass(frozen=True)
class Frame:
    """One evaluation item: `load_gt()` -> H x W metres (0 = none; raises MissingGroundTruth),
    `load_image()` -> H x W x 3 uint8 RGB as the network should see it (for --checkpoint)."""

    key: str
    load_gt: Callable[[], np.ndarray]
    load_image: Callable[[], np.ndarray] | None = None


def resolve_kitti_data(data: str | pathlib.Path) -> tuple[pathlib.Path | None, pathlib.Path | None]:
    """--data -> (raw root, depth root); either may be None when that layout is absent."""
    data = pathlib.Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"data folder not found: {data}")
    if (data / "raw").is_dir() or (data / "depth").is_dir():
        raw, depth = data / "raw", data / "depth"
    elif (data / "train").is_dir() or (data / "val").is_dir():
        raw, depth = data.parent / "raw", data
    else:  # a raw-only folder; a `depth/` beside a folder named `raw` is used too
        raw, depth = data, (data.parent / "depth" if data.name == "raw" else data / "depth")
    return (raw if raw.is_dir() else None), (depth if depth.is_dir() else None)


def _kitti_image_loader(raw_root: pathlib.Path | None, line: SplitLine):
    def load() -> np.ndarray:
        if raw_root is None:
            raise FileNotFoundError("no KITTI raw folder: images are needed with --checkpoint")
        base = raw_root / line.folder / f"image_0{line.cam}" / "data" / f"{line.frame:010d}"
        for ext in (".png", ".jpg"):
            if base.with_suffix(ext).is_file():
                return load_rgb(base.with_suffix(ext))  # the training loader's decoder
        raise FileNotFoundError(f"image not found: {base}.png")
    return load


def eigen_frames(lines: Sequence[SplitLine], raw_root: pathlib.Path, gt_depth: str = "velo_x") -> list[Frame]:
    """Eigen split: ground truth from each frame's velodyne scan, projected into image_02 (l) or
    image_03 (r; the Eigen test list has only l) with its date's calibration. Missing
    calibration fails here, before any work."""
    if raw_root is None:
        raise FileNotFoundError("the eigen protocol needs the KITTI raw folder (velodyne scans)")
    calibs = {}
    for line in lines:
        key = (line.folder.split("/")[0], line.cam)
        if key not in calibs:
            calibs[key] = load_kitti_calib(raw_root / key[0], key[1])  # CalibrationError if absent

    def gt_loader(line: SplitLine):
        calib = calibs[(line.folder.split("/")[0], line.cam)]
        scan = gtlib.kitti_velodyne_path(raw_root, line.folder, line.frame)
        return lambda: gtlib.velodyne_depth_map(gtlib.read_velodyne_bin(scan), calib, depth=gt_depth)

    return [Frame(str(ln), gt_loader(ln), _kitti_image_loader(raw_root, ln)) for ln in lines]


def eigen_benchmark_frames(lines: Sequence[SplitLine], depth_root: pathlib.Path | None,
                           raw_root: pathlib.Path | None = None) -> list[Frame]:
    if depth_root is None:
        raise FileNotFoundError("the eigen_benchmark protocol needs the KITTI depth folder (improved ground truth)")

    def gt_loader(line: SplitLine):
        return lambda: gtlib.read_depth_png(benchmark_gt_path(depth_root, line))

    return [Frame(str(ln), gt_loader(ln), _kitti_image_loader(raw_root, ln)) for ln in lines]


def make3d_frames(folder: str | pathlib.Path, names: Sequence[str] | None = None) -> list[Frame]:
    """Make3D pairs sorted by name (or in the order of `names`); ground truth = the 21 centre
    rows of the 55 x 305 laser depth, image = its 2:1 centre crop."""
    pairs = {p.name: p for p in m3d.find_make3d_pairs(folder)}
    order = list(names) if names is not None else sorted(pairs)
    frames = []
    for name in order:
        pair = pairs.get(name)
        depth_path = pair.depth_path if pair and pair.depth_path else pathlib.Path(folder) / f"{m3d.DEPTH_PREFIX}{name}.mat"
        image_path = pair.image_path if pair else pathlib.Path(folder) / f"{m3d.IMAGE_PREFIX}{name}.jpg"
        frames.append(Frame(
            name,
            lambda p=depth_path: m3d.crop_make3d_depth(m3d.load_make3d_depth(p)),
            lambda p=image_path: m3d.crop_make3d_image(m3d.load_make3d_image(p)),
        ))
    return frames


class Accumulator:
    """Per-frame metrics, scale ratios and the list of frames that could not be evaluated
    (also what the bag evaluator node scores its frames with, one at a time). Frames given an
    uncertainty map are also scored by sparsification; `sequence` (frames added in temporal
    order, one drive) adds the scale stability of their needed scales to the result."""

    def __init__(self, cfg: EvalConfig, sequence: bool = False):
        self.cfg, self.per_frame, self.ratios, self.missing = cfg, [], [], []
        self.n_listed = 0
        self.sequence = sequence
        self.sparse_frames = []  # per frame with uncertainty: sparsification.frame_sparsification

    def add(self, key: str, gt: np.ndarray, pred: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        cfg = self.cfg
        gt = np.asarray(gt, dtype=np.float32)
        pred = metrics.resize_prediction(pred, *gt.shape)
        valid = np.isfinite(gt) & (gt > cfg.min_depth) & (gt < cfg.max_depth)
        if cfg.garg_crop:
            valid &= metrics.garg_crop_mask(*gt.shape)
        if not valid.any():
            self.missing.append({"frame": key, "reason": "no valid ground-truth pixel in the mask"})
            return
        try:
            values, ratio = metrics.evaluate_frame(gt, pred, valid, scaling=cfg.scaling, scale=cfg.scale,
                                             clip=(cfg.clip_min, cfg.clip_max))
            # the scale this frame needs, whatever the scaling mode: the stability metric's input
            needed = ratio if cfg.scaling == "median" else metrics.median_scale(gt[valid], pred[valid])
            entry = {"frame": key, "n_valid": int(valid.sum()), "ratio": ratio, "needed_scale": needed, **values}
            if uncertainty is not None:
                entry["uncertainty"] = self._sparsify(gt[valid], pred[valid], ratio, uncertainty, valid)
        except ValueError as e:
            raise ValueError(f"frame {key}: {e}") from None
        self.per_frame.append(entry)
        self.ratios.append(ratio)

    def _sparsify(self, g: np.ndarray, raw: np.ndarray, ratio: float, uncertainty: np.ndarray, valid) -> dict:
        """Sparsification of the scaled, clipped prediction ranked by the uncertainty (resized to
        the ground truth like the depth) on the frame's valid pixels."""
        u = metrics.resize_prediction(uncertainty, *valid.shape)[valid]
        p = np.clip(raw.astype(np.float64) * ratio, self.cfg.clip_min, self.cfg.clip_max)
        frame = sparsification.frame_sparsification(g.astype(np.float64), p, u)
        self.sparse_frames.append(frame)
        return sparsification.frame_summary(frame)

    def result(self, **details) -> dict:
        cfg = self.cfg
        out = {
            "protocol": cfg.protocol,
            "gt_depth": details.pop("gt_depth", GT_DEPTH.get(cfg.protocol, cfg.gt_depth)),
            "n_frames_listed": self.n_listed,
            "n_frames": len(self.per_frame),
            "n_missing": len(self.missing),
            "missing": self.missing,
            "metrics": metrics.mean_metrics(self.per_frame) if self.per_frame else None,
            "scaling": ({"mode": "median", **metrics.ratio_stats(self.ratios)} if cfg.scaling == "median"
                        else {"mode": "fixed", "scale": cfg.scale}) if self.per_frame else {"mode": cfg.scaling},
            "settings": cfg.to_dict(),
            "sequence": self.sequence,
            **details,
        }
        if self.sparse_frames:
            out["uncertainty"] = sparsification.mean_over_frames(self.sparse_frames)
        if self.sequence and self.per_frame:
            out["scale_stability"] = scale_stability.from_per_frame(self.per_frame)
        out["per_frame"] = self.per_frame
        return out


def split_prediction(pred) -> tuple[np.ndarray, np.ndarray | None]:
    """A prediction is a depth map, or a (depth, uncertainty) pair when uncertainty is scored."""
    return (pred[0], pred[1]) if isinstance(pred, tuple) else (pred, None)


def is_sequence(lines: Sequence[SplitLine]) -> bool:
    """Split lines that are one drive and camera in increasing frame order (e.g. the demo's
    held-out synthetic drive): their frames are a sequence for the scale-stability metric."""
    return len({(ln.folder, ln.cam) for ln in lines}) == 1 and all(
        a.frame < b.frame for a, b in zip(lines, lines[1:]))


def run_evaluation(frames: Sequence[Frame], predictions: Sequence, cfg: EvalConfig, /,
                   progress: Callable[[Iterable], Iterable] = iter, sequence: bool = False, **details) -> dict:
    """Evaluate `predictions[i]` (a depth map, or a (depth, uncertainty) pair) against
    `frames[i]`; missing ground truth or images are listed. `sequence`: the frames are one drive
    in temporal order (scale stability is reported)."""
    if len(predictions) != len(frames):
        raise ValueError(f"{len(predictions)} predictions for {len(frames)} frames: they must match one to one")
    acc = Accumulator(cfg, sequence=sequence)
    acc.n_listed = len(frames)
    for i in progress(range(len(frames))):
        frame = frames[i]
        try:
            gt = frame.load_gt()
        except gtlib.MissingGroundTruth as e:
            acc.missing.append({"frame": frame.key, "reason": str(e)})
            continue
        try:
            pred = predictions[i]
        except FileNotFoundError as e:  # --checkpoint: the image of this frame is absent
            acc.missing.append({"frame": frame.key, "reason": str(e)})
            continue
        acc.add(frame.key, gt, *split_prediction(pred))
    return acc.result(**details)


def evaluate_bag_samples(samples: Iterable[tuple], predict_fn: Callable[[object], np.ndarray],
                         cfg: EvalConfig | None = None, gt_depth: str = "lidar") -> dict:
    """Bag protocol. samples: `(image, lidar_depth HxW metres, 0 = no return)` or
    `(image, lidar_depth, name)`; lidar_depth None marks a frame without a scan (listed as
    missing). predict_fn(image) -> depth map (any resolution, resized to the LiDAR map) or a
    (depth, uncertainty) pair; the image is passed through untouched. gt_depth: the depth
    definition reported. The samples are a bag's frames in order: scale stability is reported."""
    cfg = cfg or EvalConfig.for_protocol("bag")
    acc = Accumulator(cfg, sequence=True)
    for i, sample in enumerate(samples):
        image, depth = sample[0], sample[1]
        key = str(sample[2]) if len(sample) > 2 else f"sample {i}"
        acc.n_listed += 1
        if depth is None:
            acc.missing.append({"frame": key, "reason": "no LiDAR scan paired with this image"})
            continue
        acc.add(key, depth, *split_prediction(predict_fn(image)))
    return acc.result(gt_depth=gt_depth)
