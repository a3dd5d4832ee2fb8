"""Training samples from a folder of video frames (sorted image files, known intrinsics)."""
from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
import torch

from diffsql_model.data.augment import AugmentConfig, build_sample, draw_augmentation
from diffsql_model.data.images import load_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class ImageFolderDataset(torch.utils.data.Dataset):
    """Frames of one recorded video, sorted by file name; neighbours are the adjacent files.

    Intrinsics of the original images: `K` (3x3) or fx, fy, cx, cy. Frames whose neighbours
    fall outside the sequence are not centres (`self.skipped` lists them).
    """

    def __init__(
        self,
        folder: str | pathlib.Path,
        K: np.ndarray | None = None,
        height: int = 192,
        width: int = 640,
        frame_ids: Sequence = (0, -1, 1),
        fx: float | None = None,
        fy: float | None = None,
        cx: float | None = None,
        cy: float | None = None,
        is_train: bool = True,
        augment: AugmentConfig | None = None,
    ):
        self.folder = pathlib.Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.folder}")
        if K is None:
            if None in (fx, fy, cx, cy):
                raise ValueError("give K (3x3) or all of fx, fy, cx, cy")
            K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)
        self.K = np.asarray(K, dtype=np.float64).reshape(3, 3)
        if "s" in frame_ids:
            raise ValueError("an image folder has no stereo partner: drop 's' from frame_ids")
        self.frame_ids = [int(f) for f in frame_ids]
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {self.folder}")
        lo, hi = min(self.frame_ids + [0]), max(self.frame_ids + [0])
        self.centres = list(range(-lo, len(self.files) - hi))
        # the first -lo and the last hi files lack a neighbour
        self.skipped = [str(f) for f in self.files[:-lo] + self.files[len(self.files) - hi:]]
        if not self.centres:
            raise ValueError(f"{self.folder}: {len(self.files)} images are too few for frame ids {self.frame_ids}")
        self.height, self.width = height, width
        self.is_train = is_train
        self.augment = augment or AugmentConfig()

    def __len__(self) -> int:
        return len(self.centres)

    def __getitem__(self, index: int) -> dict:
        i = self.centres[index]
        images = {fid: load_rgb(self.files[i + fid]) for fid in self.frame_ids}
        sample = build_sample(images, self.K, self.height, self.width,
                              draw_augmentation(self.augment, self.is_train))
        sample["index"] = i
        sample["name"] = self.files[i].name
        sample["stamp"] = -1  # a plain folder has no capture times
        return sample
