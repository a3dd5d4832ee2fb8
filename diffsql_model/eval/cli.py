"""`diffsql-eval`: the paper's KITTI / Make3D tables from a checkpoint or saved predictions.

  diffsql-eval --protocol eigen --data /data/kitti --split-file eigen/test_files.txt \
      --checkpoint model.pt --json out.json
  diffsql-eval --protocol make3d --data /data/make3d --predictions preds.npz
  diffsql-eval --protocol bag --data drive.bag --image-topic /cam/image_raw --checkpoint model.pt

--predictions: an .npz whose array `depth` holds one depth map in metres (any resolution) per
frame, in the order of the split file (make3d: pairs sorted by name, or the names listed in
--split-file): a stacked N x H x W (or N x 1 x H x W) array, or an object array of maps.
Make3D predictions are for the 2:1 centre-cropped image. With --uncertainty, an array
`uncertainty` of the same layout holds each frame's standard deviation in metres.

--uncertainty: sparsification of each frame's errors by its uncertainty (the model's
`uncertainty` output, std in metres, and std / depth): AUSE and AURG for AbsRel and RMSE
(eval/sparsification.py, Poggi et al. CVPR 2020's area convention). Frames that are a sequence
(bag; one drive of a split in increasing frame order) also get the scale stability of
median(gt) / median(pred) (eval/scale_stability.py).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import zipfile

import numpy as np
import torch

from diffsql_model.checkpoint import load_model
from diffsql_model.data.kitti import read_split_file
from diffsql_model.data.network_input import to_tensor_resized
from diffsql_model.device import resolve_device
from diffsql_model.eval import metrics, pose_eval, protocols, scale_stability, sparsification
from diffsql_model.runtimes import RUNTIMES, build_runtime

TABLE = {"make3d": metrics.MAKE3D_COLUMNS}


def load_predictions(path: str | pathlib.Path, name: str = "depth") -> list[np.ndarray]:
    """Array `name` of an .npz -> list of H x W float32 maps (clear errors for anything else)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"predictions file {path} is truncated or not an .npz (np.savez) archive")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if name not in npz.files:
                raise KeyError(f"{path} has no array '{name}' (arrays: {npz.files})")
            try:
                depth = npz[name]
            except ValueError:
                # an object array of maps of different sizes: the user's own file, unpickled
                with np.load(path, allow_pickle=True) as npz_obj:
                    depth = npz_obj[name]
    except KeyError as e:
        raise ValueError(str(e).strip("'\"")) from None
    except Exception as e:  # zipfile / zlib / OS errors of a damaged archive
        raise ValueError(f"predictions file {path} is corrupt: {e}") from None
    if depth.dtype == object:
        maps = [np.asarray(d, dtype=np.float32) for d in depth]
    elif depth.ndim in (3, 4):
        maps = [np.asarray(d, dtype=np.float32) for d in depth]
    else:
        raise ValueError(f"{path}: '{name}' must be N x H x W, N x 1 x H x W or an object array, got {depth.shape}")
    for i, d in enumerate(maps):
        if d.squeeze().ndim != 2:
            raise ValueError(f"{path}: {name} map {i} has shape {d.shape}, expected one H x W map")
    return [d.squeeze() if d.ndim > 2 else d for d in maps]


def load_prediction_pairs(path: str | pathlib.Path, uncertainty: bool) -> list:
    """--predictions: depth maps, or (depth, uncertainty) pairs with --uncertainty."""
    depth = load_predictions(path)
    if not uncertainty:
        return depth
    unc = load_predictions(path, "uncertainty")
    if len(unc) != len(depth):
        raise ValueError(f"{path}: {len(unc)} uncertainty maps for {len(depth)} depth maps")
    return list(zip(depth, unc))


class CheckpointNet:
    """A checkpoint's network on `device` in a runtime (runtimes.py: eager, compile, onnxruntime,
    tensorrt): B x 3 x h x w images in [0, 1] at its size (cfg.height x cfg.width), B <=
    max_batch -> B x h x w depth; with `uncertainty`, B (depth, uncertainty) pairs of h x w maps
    (one forward gives both)."""

    def __init__(self, checkpoint, device: str, sd_path=None, uncertainty: bool = False,
                 runtime: str = "eager", max_batch: int = 8):
        self.device = resolve_device(device)
        self.model, self.cfg = load_model(checkpoint, self.device, sd_path=sd_path)
        self.uncertainty = uncertainty
        self.runtime = build_runtime(self.model, runtime, (self.cfg.height, self.cfg.width), "fp32",
                                     self.device, max_batch=max(1, max_batch))

    def __call__(self, images):
        maps = self.runtime(images.to(self.device)).cpu().numpy()  # B x 2 x h x w: depth, uncertainty
        return [(m[0], m[1]) for m in maps] if self.uncertainty else maps[:, 0]


class ModelPredictions:
    """Lazy, batched predictions of a checkpoint: `[i]` runs the batch holding frame i once.
    Images get the training resize (bilinear, antialiased) to the network size."""

    def __init__(self, frames, checkpoint, device: str, batch_size: int, sd_path=None, uncertainty: bool = False,
                 runtime: str = "eager"):
        self.frames, self.batch_size = frames, max(1, batch_size)
        self.net = CheckpointNet(checkpoint, device, sd_path, uncertainty, runtime, self.batch_size)
        self._cache = {}

    def __len__(self):
        return len(self.frames)

    def _run(self, start: int):
        self._cache = {}
        images, ok = [], []
        for i in range(start, min(start + self.batch_size, len(self.frames))):
            try:
                images.append(to_tensor_resized(self.frames[i].load_image(), self.net.cfg.height, self.net.cfg.width))
                ok.append(i)
            except FileNotFoundError as e:
                self._cache[i] = e
        if images:
            self._cache.update(zip(ok, self.net(torch.stack(images))))

    def __getitem__(self, i: int):
        if i not in self._cache:
            self._run(i - i % self.batch_size)
        value = self._cache[i]
        if isinstance(value, Exception):
            raise value
        return value


def build_frames(args) -> tuple[list[protocols.Frame], dict]:
    """The protocol's frames and the details reported with the result (`sequence`: the frames
    are one drive in temporal order)."""
    details = {"data": str(args.data), "split_file": str(args.split_file) if args.split_file else None,
               "sequence": False}
    if args.protocol == "make3d":
        names = None
        if args.split_file:
            names = [ln.split()[0] for ln in pathlib.Path(args.split_file).read_text().splitlines() if ln.strip()]
        return protocols.make3d_frames(args.data, names), details
    if not args.split_file:
        raise ValueError(f"--split-file is required for --protocol {args.protocol}")
    lines = read_split_file(args.split_file)
    raw, depth = protocols.resolve_kitti_data(args.data)
    details.update(raw_root=str(raw) if raw else None, depth_root=str(depth) if depth else None,
                   sequence=protocols.is_sequence(lines))
    if args.protocol == "eigen":
        return protocols.eigen_frames(lines, raw, args.gt_depth), details
    return protocols.eigen_benchmark_frames(lines, depth, raw), details


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="diffsql-eval", description=__doc__.split("\n")[0])
    ap.add_argument("--protocol", required=True, choices=protocols.PROTOCOLS)
    ap.add_argument("--data", required=True, type=pathlib.Path,
                    help="KITTI root with raw/ and depth/ (or raw-only / depth folder), Make3D folder, or a bag")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=pathlib.Path)
    src.add_argument("--predictions", type=pathlib.Path, help=".npz with array 'depth' (metres), one map per frame")
    ap.add_argument("--split-file", type=pathlib.Path)
    ap.add_argument("--json", type=pathlib.Path, help="write the full result (per frame, missing frames) here")
    ap.add_argument("--scaling", choices=("median", "fixed"), default="median")
    ap.add_argument("--scale", type=float, default=1.0, help="with --scaling fixed: pred * scale")
    ap.add_argument("--no-garg-crop", dest="garg_crop", action="store_false",
                    help="eigen / eigen_benchmark: score every valid pixel (cameras other than KITTI's, e.g. the "
                    "demo's synthetic drive)")
    ap.add_argument("--gt-depth", choices=("velo_x", "cam_z"), default="velo_x",
                    help="eigen ground truth: velodyne forward x (standard) or camera z")
    ap.add_argument("--image-topic", help="bag: camera image topic (default: the only one)")
    ap.add_argument("--lidar-topic", help="bag: PointCloud2 topic (default: the only one)")
    ap.add_argument("--lidar-tolerance", type=float, default=0.05, help="bag: max image-scan stamp gap, s")
    ap.add_argument("--extrinsic", help="bag: LiDAR -> camera optical frame, 'x y z qx qy qz qw' or 12/16 "
                    "row-major numbers (default: /tf_static of the bag)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sd-path", type=pathlib.Path,
                    help="local SD folder, for checkpoints without the frozen SD weights (default: as trained)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--runtime", choices=RUNTIMES, default="eager",
                    help="inference runtime (runtimes.py); outputs match eager within its tested tolerance")
    ap.add_argument("--uncertainty", action="store_true",
                    help="also score the uncertainty by sparsification (AUSE, AURG); with --predictions "
                    "the .npz needs an array 'uncertainty'")
    ap.add_argument("--pose", action="store_true",
                    help="eigen / eigen_benchmark: also grade the checkpoint's PoseNet against the drives' "
                    "poses.txt (rotation, translation direction and magnitude of frames -1 / +1)")
    return ap.parse_args(argv)


def evaluate(args) -> dict:
    if getattr(args, "pose", False) and (not args.checkpoint or args.protocol not in ("eigen", "eigen_benchmark")):
        raise ValueError("--pose needs --checkpoint (its PoseNet) and --protocol eigen or eigen_benchmark")
    crop = {} if getattr(args, "garg_crop", True) else {"garg_crop": False}
    cfg = protocols.EvalConfig.for_protocol(args.protocol, scaling=args.scaling, scale=args.scale,
                                            gt_depth=args.gt_depth, **crop)
    if args.protocol == "bag":
        return _evaluate_bag(args, cfg)
    frames, details = build_frames(args)
    unc = getattr(args, "uncertainty", False)
    if args.predictions:
        preds = load_prediction_pairs(args.predictions, unc)
        if len(preds) != len(frames):
            raise ValueError(f"{args.predictions} holds {len(preds)} depth maps but the protocol lists "
                             f"{len(frames)} frames: one map per split-file line, in order")
        details["predictions"] = str(args.predictions)
    else:
        preds = ModelPredictions(frames, args.checkpoint, args.device, args.batch_size,
                                 getattr(args, "sd_path", None), unc, getattr(args, "runtime", "eager"))
        details["checkpoint"] = str(args.checkpoint)
    result = protocols.run_evaluation(frames, preds, cfg, **details)
    if getattr(args, "pose", False):
        net = preds.net
        result["pose"] = pose_eval.evaluate_pose(args.checkpoint, protocols.resolve_kitti_data(args.data)[0],
                                                 args.split_file, net.cfg.height, net.cfg.width, net.device)
    return result


def _evaluate_bag(args, cfg) -> dict:
    """Bag protocol: camera images paired with the LiDAR scan nearest in stamp (depth = camera
    z) by `diffsql_model.data.bags.BagDataset`; predictions in the order of its samples."""
    # here, not at the top: rosbags and the bag layer load only for this protocol
    from diffsql_model.data.bag_reader import open_bag, pick_topic
    from diffsql_model.data.bag_types import CLOUD_TYPE
    from diffsql_model.data.bags import BagDataset
    from diffsql_model.data.lidar import parse_extrinsic

    with open_bag(args.data) as reader:
        lidar_topic = pick_topic(reader, args.lidar_topic, (CLOUD_TYPE,), "PointCloud2", args.data)
    unc = getattr(args, "uncertainty", False)
    if args.predictions:
        preds, size = load_prediction_pairs(args.predictions, unc), (192, 640)
    else:
        net = CheckpointNet(args.checkpoint, args.device, getattr(args, "sd_path", None), unc,
                            getattr(args, "runtime", "eager"), 1)
        size = (net.cfg.height, net.cfg.width)
    ds = BagDataset(args.data, size[0], size[1], frame_ids=(0,), image_topic=args.image_topic,
                    lidar_topic=lidar_topic, T_lidar_to_cam=parse_extrinsic(getattr(args, "extrinsic", None)),
                    is_train=False, lidar_tolerance_s=args.lidar_tolerance)
    if args.predictions and len(preds) != len(ds):
        raise ValueError(f"{args.predictions} holds {len(preds)} depth maps but the bag has {len(ds)} images")

    def samples():
        for i in range(len(ds)):
            s = ds[i]
            image = i if args.predictions else s[("color", 0)]
            depth = s["depth_gt"][0].numpy() if s["has_depth_gt"] else None
            yield image, depth, f"{s['stamp'] / 1e9:.6f}"

    def predict(image):  # a sample index with --predictions, else the network-sized image (-> map or pair)
        return preds[image] if args.predictions else net(image[None])[0]

    result = protocols.evaluate_bag_samples(samples(), predict, cfg, gt_depth="lidar_cam_z")
    result.update(data=str(args.data), image_topic=ds.images.topic, lidar_topic=lidar_topic,
                  **({"predictions": str(args.predictions)} if args.predictions else {"checkpoint": str(args.checkpoint)}))
    return result


def report(result: dict) -> str:
    lines = [f"protocol {result['protocol']}: {result['n_frames']} of {result['n_frames_listed']} frames "
             f"evaluated, ground truth: {result['gt_depth']}"]
    shown = 20  # the JSON lists every missing frame; the console the first ones
    for m in result["missing"][:shown]:
        lines.append(f"  missing: {m['frame']}: {m['reason']}")
    if len(result["missing"]) > shown:
        lines.append(f"  ... and {len(result['missing']) - shown} more missing frames (all listed in --json)")
    sc = result["scaling"]
    if sc["mode"] == "median" and "median" in sc:
        lines.append(f"median scaling ratios: median {sc['median']:.3f}, std {sc['std']:.3f} "
                     f"(std/median {sc['std_over_median']:.3f})")
    elif sc["mode"] == "fixed":
        lines.append(f"fixed scale {sc['scale']}")
    if result["metrics"]:
        lines.append(metrics.format_table(result["metrics"], TABLE.get(result["protocol"], metrics.KITTI_COLUMNS)))
    if result.get("uncertainty"):
        lines.append(sparsification.format_table(result["uncertainty"]))
    if result.get("scale_stability"):
        lines.append(scale_stability.format_line(result["scale_stability"], "frames in order"))
    if result.get("pose"):
        lines.append(pose_eval.format_line(result["pose"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # CalibrationError, CheckpointError, ...
        print(f"diffsql-eval: error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json:
        metrics.write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0 if result["n_frames"] else 1


if __name__ == "__main__":
    sys.exit(main())
