"""Model -> depth, written once: `depth_maps` (runtimes.py, re-exported here) runs the network
(gradients off, the run precision) for every caller; `predict_depth` is its batch form for
evaluation and validation; `DepthEstimator` its camera-frame form for the ROS node and the demos
(uint8 RGB frames in, one or a batch of up to max_batch cameras; depth + uncertainty at each
frame's size, or the network's, out). Both take a runtime (eager,
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
    network size and batches 1..max_batch; onnxruntime / tensorrt keep their export / engines in `cache_dir`
    (default runtimes.default_cache_dir()). compile compiles at the first frame: call warmup()."""

    def __init__(self, model: torch.nn.Module, cfg, device: str = "cpu", precision: str = "fp32",
                 input_size: Optional[tuple[int, int]] = None, tf32: bool = True, runtime: str = "eager",
                 cache_dir: Optional[str] = None, max_batch: int = 1):
        check_precision(precision)
        check_runtime(runtime)
        self.device = resolve_device(device)
        if precision == "fp16" and self.device.type == "cpu":
            # CPU half-precision convolutions are slow or missing; bf16 is the CPU low-precision path.
            raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.precision = precision
        self.cfg = cfg
        h, w = input_size if input_size else (cfg.height, cfg.width)
        if h <= 0 or w <= 0 or h % 32 or w % 32:
            raise ValueError(f"network input size must be positive multiples of 32, got {h}x{w}")
        self.net_size = (int(h), int(w))
        self.max_batch = int(max_batch)
        self.model = model.to(self.device).eval()
        self.cuda = self.device.type == "cuda"
        self.tf32 = bool(tf32) and self.cuda and torch.cuda.get_device_capability(self.device) >= (8, 0)
        self.runtime = build_runtime(self.model, runtime, self.net_size, precision, self.device,
                                     cache_dir=cache_dir, tf32=self.tf32, max_batch=self.max_batch)
        # The float network input max_batch x 3 x h x w, reused; on CPU also uint8 planes for the split.
        self._input = torch.empty((self.max_batch, 3, h, w), dtype=torch.float32, device=self.device)
        if self.cuda:
            # (batch slot, frame shape) -> (pinned host, its numpy view, device) upload buffers,
            # made at the first frame of a size in a slot: cameras of several sizes keep theirs.
            self._staging: dict = {}
            self._out_host = torch.empty(self.max_batch * 2 * h * w, dtype=torch.float32, pin_memory=True)
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        else:
            self._planes = [np.empty((h, w), np.uint8) for _ in range(3)]
        self.timing = dict.fromkeys(TIMING_KEYS, 0.0)
        self.warmup_ms: Optional[float] = None

    def warmup(self, frame_shape: Optional[tuple[int, int]] = None) -> float:
        """Inference on black frames (default: network size; a full batch, so every batch size the
        runtime builds for is met once on CUDA graphs' and engines' largest), so the first camera
        frame does not pay cuDNN autotuning, CUDA context and allocator growth. Eval mode: no
        state changes, later results are the same. Returns (and keeps in `warmup_ms`) its time."""
        h, w = frame_shape or self.net_size
        watch = Stopwatch()
        with watch("warmup"):
            self.predict_batch([np.zeros((h, w, 3), np.uint8)] * self.max_batch)
            if self.max_batch > 1:
                self.predict(np.zeros((h, w, 3), np.uint8))
        self.warmup_ms = watch.ms["warmup"]
        return self.warmup_ms

    def predict(self, rgb: np.ndarray, full_size: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """rgb: HxWx3 uint8 -> (depth, uncertainty), float32, at the input size (`full_size`) or
        at the network size. The last call's breakdown is in `self.timing` (milliseconds)."""
        return self.predict_batch([rgb], full_size)[0]

    @torch.inference_mode()
    def predict_batch(self, rgbs: list, full_size: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        """Frames (of any sizes, 1..max_batch of them) through one network call -> per frame
        (depth, uncertainty) as `predict` gives them; `self.timing` is the whole batch's."""
        if not 1 <= len(rgbs) <= self.max_batch:
            raise ValueError(f"{len(rgbs)} frames: this estimator takes 1..{self.max_batch} at once")
        for rgb in rgbs:
            check_rgb(rgb)
            if rgb.shape[0] < 2 or rgb.shape[1] < 2:
                raise ValueError(f"image too small: {rgb.shape[0]}x{rgb.shape[1]}")
        sizes = [rgb.shape[:2] if full_size else self.net_size for rgb in rgbs]
        # A frame resized back travels h x w x 2 (one 2-channel cv2 resize); else 2 x h x w planes.
        hw2 = any(size != self.net_size for size in sizes)
        watch = Stopwatch(TIMING_KEYS)
        if self.cuda:
            with cuda_math_mode(self.tf32):
                stacked = self._predict_cuda(rgbs, watch, hw2)  # a view on the pinned output buffer
        else:
            stacked = self._predict_cpu(rgbs, watch, hw2)  # a fresh array
        with watch("postprocess_ms"):
            out = [self._split(stacked[i], size, hw2) for i, size in enumerate(sizes)]
        self.timing = watch.ms
        return out

    def _split(self, maps: np.ndarray, size: tuple, hw2: bool) -> tuple[np.ndarray, np.ndarray]:
        """One frame's stacked maps -> two contiguous planes of its own (the pinned buffer and the
        batch array are the next frame's), at `size`."""
        if not hw2:
            return (maps[0].copy(), maps[1].copy()) if self.cuda else (maps[0], maps[1])
        if tuple(size) != self.net_size:
            maps = cv2.resize(maps, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)  # h x w x 2
        return np.ascontiguousarray(maps[..., 0]), np.ascontiguousarray(maps[..., 1])  # faster than cv2.split

    def _predict_cpu(self, rgbs: list, watch: Stopwatch, hw2: bool) -> np.ndarray:
        n = len(rgbs)
        with watch("preprocess_ms"):
            for i, rgb in enumerate(rgbs):
                resize_to_unit_uint8(rgb, self._input[i:i + 1], self._planes)
        with watch("model_ms"):
            stacked = self.runtime(self._input[:n])  # n x 2 x h x w: depth, uncertainty
            if hw2:
                stacked = stacked.permute(0, 2, 3, 1).contiguous()  # n x h x w x 2 for cv2.resize
            stacked = stacked.numpy()
        return stacked

    def _upload(self, slot: int, rgb: np.ndarray) -> torch.Tensor:
        """The raw frame into its pinned staging buffer, then an async copy to the GPU (both
        reused while the slot's frame size stays). The staging buffer is free again here: the
        previous batch's result was waited for, and its upload came before it on the same stream."""
        key = (slot, rgb.shape)
        if key not in self._staging:
            host = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)
            self._staging[key] = (host, host.numpy(), torch.empty(rgb.shape, dtype=torch.uint8, device=self.device))
        host, host_np, frame = self._staging[key]
        np.copyto(host_np, rgb)  # reads strided and read-only views (ROS messages) too
        return frame.copy_(host, non_blocking=True)

    def _predict_cuda(self, rgbs: list, watch: Stopwatch, hw2: bool) -> np.ndarray:
        """Timed with CUDA events on the device's stream; the one wait is for the result. The GPU
        is idle at the first event (the last batch was waited for), so the preprocess time runs
        from the host's start, staging copies included."""
        stream = torch.cuda.current_stream(self.device)
        ev = self._events
        n = len(rgbs)
        ev[0].record(stream)
        for i, rgb in enumerate(rgbs):
            frame = self._upload(i, rgb)  # H x W x 3 uint8 on the GPU, resized there
            self._input[i:i + 1].copy_(resize_to_unit(frame, self.net_size))
        ev[1].record(stream)
        stacked = self.runtime(self._input[:n])
        stacked = (stacked.permute(0, 2, 3, 1) if hw2 else stacked).contiguous()
        ev[2].record(stream)
        out = self._out_host[: stacked.numel()].view(stacked.shape)
        out.copy_(stacked, non_blocking=True)
        ev[3].record(stream)
        ev[3].synchronize()  # the result is needed on the host now
        for stage, (start, end) in zip(TIMING_KEYS, zip(ev, ev[1:])):
            watch.add(stage, start.elapsed_time(end))
        return out.numpy()
