"""Training and validation datasets named by a DataConfig (KITTI raw, ROS bags, image folders)."""
from __future__ import annotations

import pathlib

import torch

from ..config import ModelConfig
from ..yaml_config import ConfigError
from ..data.bags import BagDataset
from ..data.folder import ImageFolderDataset
from ..data.ground_truth import read_depth_png
from ..data.kitti import KittiRawDataset, SplitLine, benchmark_gt_path
from .config import DataConfig


class WithDepthPng(torch.utils.data.Dataset):
    """A KittiRawDataset whose samples get "depth_gt" from KITTI depth PNGs (improved ground
    truth layout `<depth_root>/{train,val}/<drive>/proj_depth/groundtruth/image_0X/<frame>.png`)."""

    def __init__(self, base, depth_root: str | pathlib.Path):
        self.base = base
        self.paths = [benchmark_gt_path(pathlib.Path(depth_root), SplitLine(folder, frame, side))
                      for folder, frame, side in base.lines]  # fails now, naming a missing PNG

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        sample = self.base[i]
        sample["depth_gt"] = torch.from_numpy(read_depth_png(self.paths[i]))[None]
        return sample


def _require(value, what: str):
    if not value:
        raise ConfigError(f"data.{what} is required for data.kind")
    return value


def build_datasets(cfg: DataConfig, model_cfg: ModelConfig):
    """(train set, validation set or None) at the model's input size."""
    size = {"height": model_cfg.height, "width": model_cfg.width}
    temporal = [0] + cfg.temporal_ids
    if cfg.kind == "kitti":
        root = _require(cfg.root, "root")
        train = KittiRawDataset(root, _require(cfg.train_split, "train_split"), frame_ids=temporal,
                                stereo=cfg.stereo, is_train=True, **size, **cfg.options)
        val = None
        if cfg.val_split:
            val = KittiRawDataset(cfg.val_root or root, cfg.val_split, frame_ids=[0], is_train=False,
                                  load_depth=cfg.depth_root is None, **size)
            if cfg.depth_root:
                val = WithDepthPng(val, cfg.depth_root)
        return train, val
    if cfg.kind == "bag":
        topic = {"image_topic": cfg.camera_topic} if cfg.camera_topic else {}
        train = BagDataset(_require(cfg.root, "root"), frame_ids=cfg.frame_ids, is_train=True,
                           **size, **topic, **cfg.options)
        val = None
        if cfg.val_root:  # a bag with a LiDAR topic (val_options: lidar_topic=...) gives depth_gt
            val = BagDataset(cfg.val_root, frame_ids=[0], is_train=False, **size, **topic, **cfg.val_options)
        return train, val
    if cfg.kind == "folder":
        train = ImageFolderDataset(_require(cfg.root, "root"), frame_ids=cfg.frame_ids, is_train=True,
                                   **size, **cfg.options)
        return train, None
    raise ConfigError(f"unknown data.kind {cfg.kind!r}")
