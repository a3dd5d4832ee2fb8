"""Model -> depth, written once: `depth_maps` (runtimes.py, re-exported here) runs the network
(gradients off, the run precision) for every caller; `predict_depth` is its batch form for
evaluation and validation; `DepthEstimator` its single-frame form for the ROS node and the demos
(uint8 RGB frame in, depth + uncertainty at the frame's size out). Both take a runtime (eager,
compile, onnxruntime, tensorrt: runtimes.py). Knows nothing about ROS.

The estimator allocates the network input once per input size and reuses it, so a camera stream
allocates only the outputs. On CUDA the raw frame goes up through a pinned staging buffer (reused
while the frame size stays) and is resized on the GPU; the only synchronisation per frame is the
one that waits for the result.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import cv2
import numpy as np
import torch

from .data.network_input import check_rgb, resize_to_unit, resize_to_unit_uint8
from .device import check_precision, resolve_device
from .runtimes import RUNTIMES, Runtime, build_runtime, check_runtime, depth_maps  # noqa: F401 (API)
from .timing import Stopwatch

TIMING_KEYS = ("preprocess_ms", "model_ms", "postprocess_ms")


def predict_depth(model: torch.nn.Module, images: torch.Tensor, *, device: Optional[torch.device] = None,
                  precision: str = "fp32", runtime: Optional[Runtime] = None) -> np.ndarray:
    """B x 3 x h x w images in [0, 1] -> B x h x w float32 depth on the host, at the network size
    (the evaluation protocols resize it to the ground truth). `device`: the model's, where the
    images are moved first (None: they are there already). `runtime`: a `build_runtime` of this
    model (its own precision, input size and max_batch apply) instead of eager."""
    if device is not None:
        images = images.to(device)
    if runtime is not None:
        return runtime(images)[:, 0].cpu().numpy()
    return depth_maps(model, images, precision)[:, 0].cpu().numpy()


@contextlib.contextmanager
def cuda_math_mode(tf32: bool):
    """cuDNN autotuning on, fp32 matmuls and convolutions in TF32 (`tf32`) or IEEE fp32, for the
    block only, then the caller's settings back: the flags are process-wide, and other code in
    the process (training, tests) must keep its own. Uses the fp32_precision API of torch >= 2.9
    (the allow_tf32 flags are its legacy form; mixing both makes torch raise)."""
    matmul, conv, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn
    old = (matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark)
    mode = "tf32" if tf32 else "ieee"
    matmul.fp32_precision = conv.fp32_precision = mode
    cudnn.benchmark = True  # one fixed input size: the autotuned algorithms are found once
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark = old


class DepthEstimator:
    """Wraps a DiffSQLDepth-like model (image B3HW in [0,1] -> dict with depth/uncertainty B1HW).

    tf32: on CUDA devices of compute capability >= 8.0 (Ampere and newer), fp32 matmuls and
    convolutions run on TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation); False
    keeps IEEE fp32 for both. No effect on CPU or older GPUs (`self.tf32` says what applies).

    runtime: eager (default), compile, onnxruntime or tensorrt (runtimes.py), built here for the
    network size at batch 1; onnxruntime / tensorrt keep their export / engines in `cache_dir`
    (default runtimes.default_cache_dir()). compile compiles at the first frame: call warmup()."""

    def __init__(self, model: torch.nn.Module, cfg, device: str = "cpu", precision: str = "fp32",
                 input_size: Optional[tuple[int, int]] = None, tf32: bool = True, runtime: str = "eager",
                 cache_dir: Optional[str] = None):
        check_precision(precision)
        check_runtime(runtime)
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
        self.cuda = self.device.type == "cuda"
        self.tf32 = bool(tf32) and self.cuda and torch.cuda.get_device_capability(self.device) >= (8, 0)
        self.runtime = build_runtime(self.model, runtime, self.net_size, precision, self.device,
                                     cache_dir=cache_dir, tf32=self.tf32)
        # The float network input 1x3xhxw, reused; on CPU also uint8 planes for the split.
        self._input = torch.empty((1, 3, h, w), dtype=torch.float32, device=self.device)
        if self.cuda:
            self._staging = self._frame = None  # camera-sized, made at the first frame of a size
            self._out_host = torch.empty(2 * h * w, dtype=torch.float32, pin_memory=True)
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        else:
            self._planes = [np.empty((h, w), np.uint8) for _ in range(3)]
        self.timing = dict.fromkeys(TIMING_KEYS, 0.0)
        self.warmup_ms: Optional[float] = None

    def warmup(self, frame_shape: Optional[tuple[int, int]] = None) -> float:
        """One inference on a black frame (default: network size), so the first camera frame does
        not pay cuDNN autotuning, CUDA context and allocator growth. Eval mode: no state changes,
        later results are the same. Returns (and keeps in `warmup_ms`) its wall time."""
        h, w = frame_shape or self.net_size
        watch = Stopwatch()
        with watch("warmup"):
            self.predict(np.zeros((h, w, 3), np.uint8))
        self.warmup_ms = watch.ms["warmup"]
        return self.warmup_ms

    @torch.inference_mode()
    def predict(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rgb: HxWx3 uint8 -> (depth HxW float32, uncertainty HxW float32) at the input size.

        The last call's breakdown is in `self.timing` (milliseconds)."""
        check_rgb(rgb)
        H, W = rgb.shape[:2]
        if H < 2 or W < 2:
            raise ValueError(f"image too small: {H}x{W}")
        watch = Stopwatch(TIMING_KEYS)
        if self.cuda:
            with cuda_math_mode(self.tf32):
                stacked = self._predict_cuda(rgb, watch)  # a view on the pinned output buffer
        else:
            stacked = self._predict_cpu(rgb, watch)  # a fresh array
        with watch("postprocess_ms"):
            if (H, W) != self.net_size:
                stacked = cv2.resize(stacked, (W, H), interpolation=cv2.INTER_LINEAR)  # h x w x 2
                depth = np.ascontiguousarray(stacked[..., 0])  # faster than cv2.split for 2 channels
                unc = np.ascontiguousarray(stacked[..., 1])
            else:
                # Two contiguous h x w planes of a fresh array (the pinned buffer is the next frame's).
                depth, unc = stacked.copy() if self.cuda else stacked
        self.timing = watch.ms
        return depth, unc

    def _forward(self) -> torch.Tensor:
        """The network on `self._input` -> depth and uncertainty stacked, 2 x h x w float32: they
        travel together (one copy; where the output is resized, one 2-channel resize)."""
        return self.runtime(self._input)[0]

    def _predict_cpu(self, rgb: np.ndarray, watch: Stopwatch) -> np.ndarray:
        resize = rgb.shape[:2] != self.net_size
        with watch("preprocess_ms"):
            resize_to_unit_uint8(rgb, self._input, self._planes)
        with watch("model_ms"):
            stacked = self._forward()
            if resize:
                stacked = stacked.permute(1, 2, 0).contiguous()  # h x w x 2 for cv2.resize
            stacked = stacked.numpy()
        return stacked

    def _upload(self, rgb: np.ndarray) -> torch.Tensor:
        """The raw frame into the pinned staging buffer, then an async copy to the GPU (both
        reused while the frame size stays). The staging buffer is free again here: the previous
        frame's result was waited for, and its upload came before it on the same stream."""
        if self._staging is None or tuple(self._staging.shape[:2]) != rgb.shape[:2]:
            self._staging = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)
            self._staging_np = self._staging.numpy()
            self._frame = torch.empty(rgb.shape, dtype=torch.uint8, device=self.device)
        np.copyto(self._staging_np, rgb)  # reads strided and read-only views (ROS messages) too
        return self._frame.copy_(self._staging, non_blocking=True)

    def _predict_cuda(self, rgb: np.ndarray, watch: Stopwatch) -> np.ndarray:
        """Timed with CUDA events on the device's stream; the one wait is for the result. The GPU
        is idle at the first event (the last frame was waited for), so the preprocess time runs
        from the host's start, staging copy included."""
        stream = torch.cuda.current_stream(self.device)
        ev = self._events
        resize = rgb.shape[:2] != self.net_size
        ev[0].record(stream)
        frame = self._upload(rgb)  # H x W x 3 uint8 on the GPU
        self._input.copy_(resize_to_unit(frame, self.net_size))
        ev[1].record(stream)
        stacked = self._forward()
        stacked = (stacked.permute(1, 2, 0) if resize else stacked).contiguous()
        ev[2].record(stream)
        out = self._out_host.view(stacked.shape)
        out.copy_(stacked, non_blocking=True)
        ev[3].record(stream)
        ev[3].synchronize()  # the result is needed on the host now
        for stage, (start, end) in zip(TIMING_KEYS, zip(ev, ev[1:])):
            watch.add(stage, start.elapsed_time(end))
        return out.numpy()
