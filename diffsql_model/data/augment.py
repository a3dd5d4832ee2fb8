"""Training-sample assembly shared by the KITTI, bag and folder datasets.

Resize to the network size, scale K, and (training only) the Monodepth2/SQLdepth
augmentation of PROTOCOLS.md: horizontal flip p=0.5 and colour jitter p=0.5 with
brightness/contrast/saturation in (0.8, 1.2) and hue +-0.1, one draw for all frames of a
sample. K follows the pixel convention of geometry.py (pixel centres on integer coordinates):
resizing by s maps cx -> (cx + 0.5) s - 0.5 and a flip maps cx -> W - 1 - cx.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import ColorJitter

from diffsql_model.data.network_input import to_tensor_resized
from diffsql_model.yaml_config import YamlConfig


@dataclasses.dataclass
class AugmentConfig(YamlConfig):
    flip_prob: float = 0.5
    jitter_prob: float = 0.5
    brightness: tuple[float, float] = (0.8, 1.2)
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: tuple[float, float] = (-0.1, 0.1)


def normalised_kitti_K(width: int, height: int) -> np.ndarray:
    """KITTI's average intrinsics at (width, height): fx = 0.58 W, fy = 1.92 H, c = (W/2, H/2).

    A published convention (Monodepth2 and successors), used as given at the network size:
    build it at (width, height) of the network, do not resize it from another size."""
    return np.array([[0.58 * width, 0, 0.5 * width], [0, 1.92 * height, 0.5 * height], [0, 0, 1]])


def scale_K(K: np.ndarray, src_size: tuple[int, int], dst_size: tuple[int, int]) -> np.ndarray:
    """3x3 K of an image of src_size (w, h) -> K of the same image resized to dst_size (w, h).

    Pixel centres on integers (geometry.py): a resize (align_corners=False, as torchvision and
    cv2 resize) maps u -> (u + 0.5) s - 0.5, so focal lengths and skew scale by s, c by that map.
    """
    K = np.array(K, dtype=np.float64).reshape(3, 3).copy()
    for row, s in ((0, dst_size[0] / src_size[0]), (1, dst_size[1] / src_size[1])):
        K[row, :2] *= s
        K[row, 2] = (K[row, 2] + 0.5) * s - 0.5
    return K


@dataclasses.dataclass
class AugmentDraw:
    """One random draw, shared by all frames of a sample."""

    flip: bool = False
    jitter: tuple | None = None  # ColorJitter.get_params output, None = no jitter

    def apply_color(self, img: torch.Tensor) -> torch.Tensor:
        if self.jitter is None:
            return img
        order, b, c, s, h = self.jitter
        for fn in order.tolist():  # torchvision's own random order of the four adjustments
            if fn == 0:
                img = TF.adjust_brightness(img, b)
            elif fn == 1:
                img = TF.adjust_contrast(img, c)
            elif fn == 2:
                img = TF.adjust_saturation(img, s)
            else:
                img = TF.adjust_hue(img, h)
        return img


def draw_augmentation(cfg: AugmentConfig, is_train: bool) -> AugmentDraw:
    """Draws from torch's global RNG (DataLoader seeds it per worker)."""
    if not is_train:
        return AugmentDraw()
    flip = bool(torch.rand(1).item() < cfg.flip_prob)
    jitter = None
    if torch.rand(1).item() < cfg.jitter_prob:
        jitter = ColorJitter.get_params(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    return AugmentDraw(flip, jitter)


def build_sample(
    images: dict,
    K: np.ndarray,
    height: int,
    width: int,
    draw: AugmentDraw,
    baseline_m: float | None = None,
    side_sign: float = -1.0,
    K_size: tuple[int, int] | None = None,
) -> dict:
    """Assemble the training-sample dict of docs/interfaces.md.

    images: frame id (0, -1, 1, "s") -> H x W x 3 uint8 at the original size, all the same size.
    K: 3x3 intrinsics of the original images. baseline_m: stereo baseline for ("color", "s").
    side_sign: -1 when frame 0 is the left camera (partner to its right), +1 when right.
    K_size: (w, h) whose pixels K is in, when not the images' size (normalised_kitti_K).
    """
    sizes = {fid: im.shape[:2] for fid, im in images.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"frames of one sample differ in size: {sizes}")
    h0, w0 = next(iter(sizes.values()))
    K_net = scale_K(K, K_size or (w0, h0), (width, height))
    if draw.flip:
        K_net[0, 2] = width - 1 - K_net[0, 2]  # column u -> W - 1 - u
    sample: dict = {}
    for fid, rgb in images.items():
        color = to_tensor_resized(rgb, height, width)
        if draw.flip:
            color = color.flip(-1)
        sample[("color", fid)] = color
        sample[("color_aug", fid)] = draw.apply_color(color).clamp(0.0, 1.0)
    K4 = np.eye(4)
    K4[:3, :3] = K_net
    sample["K"] = torch.from_numpy(K4).float()
    sample["inv_K"] = torch.from_numpy(np.linalg.inv(K4)).float()
    if "s" in images:
        if baseline_m is None:
            raise ValueError("a stereo partner ('s') needs the stereo baseline")
        T = np.eye(4)
        # X_src = T X_tgt: the right camera sees left-camera points shifted by -baseline in x;
        # a flip swaps which side the partner is on.
        T[0, 3] = side_sign * (-1.0 if draw.flip else 1.0) * baseline_m
        sample["stereo_T"] = torch.from_numpy(T).float()
    sample["do_flip"] = draw.flip
    sample["do_color_aug"] = draw.jitter is not None
    return sample
