"""Single-image inference: uint8 RGB frame in, metric-or-relative depth + uncertainty out.

Used by the ROS node and the demos; knows nothing about ROS. Buffers for the network input are
allocated once per input size and reused, so a camera stream allocates only the outputs.
"""
from __future__ import annotations

import time
from typing import Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is an error, not a fallback."""
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    return torch.device(device)


class DepthEstimator:
    """Wraps a DiffSQLDepth-like model (image B3HW in [0,1] -> dict with depth/uncertainty B1HW)."""

    def __init__(self, model: torch.nn.Module, cfg, device: str = "cpu", precision: str = "fp32",
                 input_size: Optional[tuple[int, int]] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        if precision == "fp16" and self.device.type == "cpu":
            # CPU half-precision convolutions are slow or missing; bf16 is the CPU low-precision path.
            raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        self.precision = precision
        self.cfg = cfg
        h, w = input_size if input_size else (cfg.height, cfg.width)
        if h <= 0 or w <= 0 or h % 32 or w % 32:
            raise ValueError(f"network input size must be positive multiples of 32, got {h}x{w}")
        self.net_size = (int(h), int(w))
        self.model = model.to(self.device).eval()
        self._autocast = precision != "fp32"
        # Reused per-frame buffers: the float network input 1x3xHxW; on CUDA the network-size
        # uint8 frame, pinned for the async host-to-device copy; on CPU uint8 planes.
        self._input = torch.empty((1, 3, h, w), dtype=torch.float32, device=self.device)
        if self.device.type == "cpu":
            self._input_np = self._input.numpy()
            self._planes = [np.empty((h, w), np.uint8) for _ in range(3)]
        else:
            self._resized = torch.empty((h, w, 3), dtype=torch.uint8, pin_memory=True)
            self._resized_np = self._resized.numpy()
        self.timing = {"preprocess_ms": 0.0, "model_ms": 0.0, "postprocess_ms": 0.0}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def predict(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rgb: HxWx3 uint8 -> (depth HxW float32, uncertainty HxW float32) at the input size.

        The last call's breakdown is in `self.timing` (milliseconds)."""
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 RGB array, got "
                             f"{getattr(rgb, 'dtype', type(rgb))} {getattr(rgb, 'shape', '')}")
        H, W = rgb.shape[:2]
        if H < 2 or W < 2:
            raise ValueError(f"image too small: {H}x{W}")
        h, w = self.net_size
        t0 = time.perf_counter()
        resize = (H, W) != (h, w)
        if resize:
            # The training resize (augment.to_tensor_resized: bilinear, antialiased) run on uint8:
            # torch's SIMD path, within rounding of the float one; at 1242x375 -> 640x192 about
            # 0.8 ms against 2.2-2.9 ms for cv2 INTER_AREA, which differs from it by up to 40/255.
            # torch wants writable memory (a frame viewed on a ROS message is not): copy those.
            rgb = np.ascontiguousarray(rgb) if rgb.flags.writeable else rgb.copy()
            src = torch.from_numpy(rgb).permute(2, 0, 1)[None]
            small = F.interpolate(src, size=(h, w), mode="bilinear", antialias=True, align_corners=False)  # 1x3xhxw
        if self.device.type == "cpu":
            if resize:
                torch.mul(small, 1.0 / 255.0, out=self._input)
            else:
                # HWC uint8 -> CHW float * 1/255 as SIMD plane splits and one float32 multiply per
                # plane (bit-identical to the torch permute-copy, ~2x faster than its strided copy).
                cv2.split(rgb, self._planes)
                for c in range(3):
                    np.multiply(self._planes[c], np.float32(1.0 / 255.0), out=self._input_np[0, c], casting="unsafe")
        else:
            if resize:  # into the pinned staging buffer of the async copy
                self._resized.copy_(small[0].permute(1, 2, 0))
            else:
                np.copyto(self._resized_np, rgb)
            src = self._resized.to(self.device, non_blocking=True)  # h x w x 3 uint8
            self._input.copy_(src.permute(2, 0, 1).unsqueeze(0)).mul_(1.0 / 255.0)
            self._sync()
        t1 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision], enabled=self._autocast):
            out = self.model(self._input)
        # 2 x h x w: depth and uncertainty travel together, one copy and one resize.
        stacked = torch.cat([out["depth"][0], out["uncertainty"][0]], 0).float()
        if resize:
            stacked = stacked.permute(1, 2, 0).contiguous()  # h x w x 2: one 2-channel resize
        stacked = stacked.cpu().numpy()
        t2 = time.perf_counter()
        if resize:
            stacked = cv2.resize(stacked, (W, H), interpolation=cv2.INTER_LINEAR)
            depth = np.ascontiguousarray(stacked[..., 0])  # faster than cv2.split for 2 channels
            unc = np.ascontiguousarray(stacked[..., 1])
        else:
            depth, unc = stacked  # two contiguous h x w planes of a fresh array: no copy
        t3 = time.perf_counter()
        self.timing = {"preprocess_ms": (t1 - t0) * 1e3, "model_ms": (t2 - t1) * 1e3,
                       "postprocess_ms": (t3 - t2) * 1e3}
        return depth, unc
