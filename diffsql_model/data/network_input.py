"""uint8 RGB frames -> the network input: 3 x h x w float32 in [0, 1]. The one owner of that resize.

The training resize is float: / 255, bilinear with antialiasing (align_corners=False), clamp.
`resize_to_unit` runs it on a torch frame on any device (CUDA has no uint8 antialiased kernel);
`to_tensor_resized` on a numpy frame (training, evaluation). The CPU estimator resizes the uint8
frame instead (`resize_to_unit_uint8`: torch's SIMD kernel), which rounds to whole grey levels
and so stays within 1/255 of the float resize (test_network_input.py).
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
import torch
from torch.nn.functional import interpolate


def check_rgb(rgb) -> None:
    """An H x W x 3 uint8 numpy frame, else a ValueError saying what came."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 RGB array, got "
                         f"{getattr(rgb, 'dtype', type(rgb))} {getattr(rgb, 'shape', '')}")


def resize_to_unit(frame: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """H x W x 3 uint8 frame on any device -> 1 x 3 x h x w float32 in [0, 1] on that device."""
    x = frame.permute(2, 0, 1).unsqueeze(0).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    x = interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(0.0, 1.0)


def to_tensor_resized(rgb: np.ndarray, height: int, width: int) -> torch.Tensor:
    """H x W x 3 uint8 numpy frame -> 3 x height x width float32 in [0, 1] (the training resize)."""
    check_rgb(rgb)
    # torch.from_numpy takes neither negative strides nor (without a warning) read-only memory
    frame = rgb if rgb.flags.writeable and rgb.flags.c_contiguous else rgb.copy()
    return resize_to_unit(torch.from_numpy(frame), (height, width))[0]


def resize_to_unit_uint8(rgb: np.ndarray, out: torch.Tensor,
                         planes: Optional[list[np.ndarray]] = None) -> torch.Tensor:
    """H x W x 3 uint8 numpy frame -> `out`, a 1 x 3 x h x w float32 CPU tensor filled in place.

    A frame of another size is resized on uint8 (at 1242x375 -> 640x192 about 0.8 ms against
    2.2-2.9 ms for cv2 INTER_AREA, which differs from the training resize by up to 40/255). A
    frame of the network size is only scaled: SIMD plane splits into `planes` (three h x w uint8
    scratch arrays, reused by a caller that has them) and one float32 multiply per plane, about
    twice as fast as torch's strided permute-copy."""
    h, w = out.shape[-2:]
    if rgb.shape[:2] != (h, w):
        # torch wants writable memory (a frame viewed on a ROS message is not): copy those
        rgb = np.ascontiguousarray(rgb) if rgb.flags.writeable else rgb.copy()
        src = torch.from_numpy(rgb).permute(2, 0, 1)[None]
        small = interpolate(src, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return torch.mul(small, 1.0 / 255.0, out=out)
    planes = planes if planes is not None else [np.empty((h, w), np.uint8) for _ in range(3)]
    cv2.split(rgb, planes)
    out_np = out.numpy()
    for c in range(3):
        np.multiply(planes[c], np.float32(1.0 / 255.0), out=out_np[0, c], casting="unsafe")
    return out
