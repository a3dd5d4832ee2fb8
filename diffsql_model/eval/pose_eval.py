"""PoseNet against ground-truth poses: drives that carry `poses.txt` (camera-to-world, KITTI
odometry format; every synthetic drive does) give relative-pose errors for each frame with both
neighbours (frames -1 and +1). Used by training's validation and by `diffsql-eval --pose`."""
from __future__ import annotations

import pathlib

import numpy as np
import torch

from ..checkpoint import load_pose_net
from ..data.kitti import KittiRawDataset, parse_split_lines
from ..data.synthetic_kitti import read_poses
from .pose_metrics import relative_pose_errors
from ..pose_net import relative_pose


class PoseValidationSet:
    """Triplets (0, -1, +1) of the validation frames whose drive has `poses.txt`, and the true
    T (target -> source camera) of each pair. Left camera only: the poses are the left camera's."""

    def __init__(self, root, split, height: int, width: int, source_ids=(-1, 1)):
        root = pathlib.Path(root)
        lines = split if isinstance(split, list) else pathlib.Path(split).read_text().splitlines()
        self.poses, keep = {}, []
        for folder, frame, side in parse_split_lines(lines):
            path = root / folder / "poses.txt"
            if side != "l" or not path.is_file():
                continue
            poses = self.poses.setdefault(folder, read_poses(path))
            if all(0 <= frame + f < len(poses) for f in source_ids):
                keep.append(f"{folder} {frame} l")
        self.source_ids = list(source_ids)
        self.dataset = KittiRawDataset(root, keep, height=height, width=width,
                                       frame_ids=[0, *self.source_ids], is_train=False) if keep else None

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else 0

    def true_pose(self, index: int, source_id: int) -> np.ndarray:
        folder, frame, _ = self.dataset.lines[index]
        poses = self.poses[folder]
        return np.linalg.inv(poses[frame + source_id]) @ poses[frame]  # X_src = T X_tgt


@torch.no_grad()
def validate_pose(pose_net: torch.nn.Module, pose_set: PoseValidationSet, device: torch.device,
                  max_frames: int = 200) -> dict:
    """Relative-pose errors (eval.pose_metrics) over up to `max_frames` triplets, every source.
    Keys are prefixed "pose_" so they sit next to the depth metrics."""
    was_training = pose_net.training
    pose_net.eval()
    pred, true = [], []
    try:
        for i in range(min(len(pose_set), max_frames)):
            sample = pose_set.dataset[i]
            target = sample[("color", 0)].unsqueeze(0).to(device)
            for f in pose_set.source_ids:
                source = sample[("color", f)].unsqueeze(0).to(device)
                pred.append(relative_pose(pose_net, target, source, f)[0].float().cpu().numpy())
                true.append(pose_set.true_pose(i, f))
    finally:
        pose_net.train(was_training)
    if not pred:
        return {}
    return {f"pose_{k}": v for k, v in relative_pose_errors(np.stack(pred), np.stack(true)).items()}


def evaluate_pose(checkpoint, raw_root, split_file, height: int, width: int, device: torch.device) -> dict:
    """`diffsql-eval --pose`: the checkpoint's PoseNet on every split frame whose drive has
    `poses.txt` and both neighbours, at the depth network's input size (as it was trained)."""
    if raw_root is None:
        raise FileNotFoundError("--pose needs the raw image folders (with poses.txt per drive)")
    pose_set = PoseValidationSet(raw_root, split_file, height, width)
    if not len(pose_set):
        raise ValueError(f"--pose: no left-camera frame of {split_file} has a poses.txt in its drive "
                         "folder and both neighbours (frames -1 and +1)")
    pose_net = load_pose_net(checkpoint, device)
    errors = validate_pose(pose_net, pose_set, device, max_frames=len(pose_set))
    return {k.removeprefix("pose_"): v for k, v in errors.items()}


def format_line(pose: dict) -> str:
    return (f"pose ({pose['pairs']} frame pairs against poses.txt): rotation {pose['rotation_deg']:.3f} deg, "
            f"translation direction {pose['translation_dir_deg']:.2f} deg, magnitude error "
            f"{pose['translation_mag_err']:.3f} (up to the median scale {pose['translation_scale']:.3f})")
