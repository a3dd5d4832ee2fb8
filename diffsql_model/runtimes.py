"""Inference runtimes: a DiffSQLDepth model + input size + precision + device -> a `Runtime`,
images B x 3 x h x w in [0, 1] -> depth and uncertainty stacked, B x 2 x h x w float32.

    eager        the model itself (autocast in the run precision)
    compile      torch.compile: default mode on CPU, mode="reduce-overhead" (CUDA graphs) on CUDA;
                 compiles at the first call (DepthEstimator.warmup pays it)
    onnxruntime  exported once (dynamo ONNX exporter, fp32) into the cache, run by ONNX Runtime
    tensorrt     Torch-TensorRT engines (CUDA; fp32, or fp16 / bf16 by TensorRT's autocast),
                 optional: requirements-gpu.txt; torch_tensorrt is imported only when chosen

onnxruntime and tensorrt build for one input size and batches 1..max_batch, and keep what they
built in a cache directory (default ~/.cache/diffsql/runtimes, or $DIFFSQL_CACHE_DIR) under a
key of the weights' hash, input size, batch, precision, device (GPU name) and library versions:
the second start with the same model loads it instead of exporting / building engines again.
`depth_maps` is the network call itself, shared by every runtime and the training validation.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Callable, Optional

import torch
import yaml

from .device import check_precision
from .export import OUTPUTS, OnnxModule, export_depth_net, trace

RUNTIMES = ("eager", "compile", "onnxruntime", "tensorrt")
GPU_REQUIREMENTS = "requirements-gpu.txt"


class RuntimeUnavailable(ValueError):
    """A runtime that cannot run here (no CUDA, package not installed) or not in this precision."""


def depth_maps(model: Callable, images: torch.Tensor, precision: str = "fp32",
               uncertainty: bool = False) -> torch.Tensor:
    """A DiffSQLDepth-like model on B x 3 x h x w images in [0, 1] (on the model's device) ->
    B x 1 x h x w float32 depth there; with `uncertainty`, B x 2 x h x w (depth, uncertainty).

    Gradients off (no_grad, not inference_mode: validation runs this on the model being trained).
    `precision` is the autocast dtype of the forward; fp32 runs without autocast."""
    dtype = check_precision(precision)
    with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype, enabled=precision != "fp32"):
        out = model(images)
    maps = torch.cat([out["depth"], out["uncertainty"]], 1) if uncertainty else out["depth"]
    return maps.float()


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    return runtime


class Runtime:
    """images B x 3 x h x w float32 on `device` -> B x 2 x h x w float32 (depth, uncertainty).
    `cache_path`: the exported model / engine file (None for eager, compile); `from_cache`:
    whether it was loaded from there rather than built by this call."""

    def __init__(self, name: str, module: Callable, input_size: tuple[int, int], precision: str,
                 device: torch.device, max_batch: int, autocast: bool,
                 cache_path: Optional[pathlib.Path] = None, from_cache: bool = False):
        self.name, self.module, self.input_size = name, module, tuple(input_size)
        self.precision, self.device, self.max_batch = precision, device, max_batch
        self.cache_path, self.from_cache = cache_path, from_cache
        self._autocast = precision if autocast else "fp32"  # engines carry their own precision
        self._fixed = cache_path is not None  # an exported graph: one size, batch <= max_batch

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self._fixed and (tuple(images.shape[-2:]) != self.input_size
                            or not 1 <= images.shape[0] <= self.max_batch):
            raise ValueError(f"runtime {self.name} was built for 1..{self.max_batch} x 3 x "
                             f"{self.input_size[0]} x {self.input_size[1]} images, got {tuple(images.shape)}")
        return depth_maps(self.module, images, self._autocast, uncertainty=True)


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes) and the model's config:
    changes when the weights do (a retrained checkpoint), not when the file is copied."""
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        h.update(yaml.safe_dump(cfg.to_dict()).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> pathlib.Path:
    if os.environ.get("DIFFSQL_CACHE_DIR"):
        return pathlib.Path(os.environ["DIFFSQL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "diffsql" / "runtimes"


def cache_entry(model, runtime: str, input_size, max_batch: int, precision: str,
                device: torch.device, cache_dir=None, **versions) -> tuple[pathlib.Path, dict]:
    """(folder of this build in the cache, the key's parts). The folder name is a hash of all
    parts; key.json inside lists them for people clearing the cache."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = {"runtime": runtime, "weights_sha256": weights_hash(model), "input": list(input_size),
           "max_batch": max_batch, "precision": precision, "device": gpu,
           "torch": torch.__version__, **versions}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    h, w = input_size
    folder = pathlib.Path(cache_dir or default_cache_dir()) / f"{runtime}-{h}x{w}-b{max_batch}-{precision}-{digest}"
    return folder, key


def _build_into(folder: pathlib.Path, key: dict, build: Callable[[pathlib.Path], None]) -> None:
    """Build into a temporary sibling, then rename: a start killed mid-build (engines take
    minutes) leaves no half-written entry that the next start would load."""
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        (tmp / "key.json").write_text(json.dumps(key, indent=1))
        os.replace(tmp, folder)
    except OSError:
        if not folder.is_dir():  # another process finished the same entry first: keep theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _onnxruntime(model, size, precision, device, max_batch, cache_dir):
    if precision != "fp32":
        raise RuntimeUnavailable(f"runtime onnxruntime runs fp32 only (got {precision}): the ONNX "
                                 "exporter cannot lower autocast; use eager/compile for bf16, tensorrt for fp16")
    try:
        import onnxruntime as ort  # optional at run time; only for its version in the cache key
    except ImportError:
        raise RuntimeUnavailable("runtime onnxruntime needs onnxruntime: pip install onnxruntime==1.31.1 "
                                 f"(requirements.txt; onnxruntime-gpu from {GPU_REQUIREMENTS} on CUDA)") from None
    folder, key = cache_entry(model, "onnxruntime", size, max_batch, precision, device, cache_dir,
                              onnxruntime=ort.__version__)
    path, cached = folder / "model.onnx", folder.is_dir()
    if not cached:
        _build_into(folder, key, lambda tmp: export_depth_net(
            model, model.cfg, tmp / "model.onnx", *size, batch=max_batch, dynamic_batch=max_batch > 1))
    return OnnxModule(path, device), path, cached


class _NamedOutputs:
    """A compiled program's outputs as the model's dict, whichever pytree the backend returns."""

    def __init__(self, module: Callable):
        self.module = module

    def __call__(self, images: torch.Tensor) -> dict:
        out = self.module(images)
        return out if isinstance(out, dict) else dict(zip(OUTPUTS, out))


def _tensorrt(model, size, precision, device, max_batch, tf32, cache_dir):
    if device.type != "cuda":
        raise RuntimeUnavailable(f"runtime tensorrt needs a CUDA device (got {device}) and Torch-TensorRT "
                                 f"(pip install -r {GPU_REQUIREMENTS}); on CPU use onnxruntime or compile")
    try:
        import torch_tensorrt  # the optional GPU extra: never imported unless chosen
    except ImportError as e:
        raise RuntimeUnavailable(f"runtime tensorrt needs Torch-TensorRT, not importable here ({e}): "
                                 f"pip install -r {GPU_REQUIREMENTS}") from None
    folder, key = cache_entry(model, "tensorrt", size, max_batch, precision, device, cache_dir,
                              torch_tensorrt=torch_tensorrt.__version__, tf32=tf32)
    path, cached = folder / "engine.ep", folder.is_dir()
    if cached:
        return _NamedOutputs(torch_tensorrt.load(str(path)).module()), path, True
    h, w = size
    if max_batch > 1:  # one engine for batches 1..max_batch, tuned for max_batch
        inputs = [torch_tensorrt.Input(min_shape=(1, 3, h, w), opt_shape=(max_batch, 3, h, w),
                                       max_shape=(max_batch, 3, h, w), dtype=torch.float32)]
    else:
        inputs = [torch.zeros(1, 3, h, w, device=device)]
    # Traced in fp32; the frozen SD keeps the dtypes it was loaded in (explicit casts in the graph).
    program = trace(model, h, w, max_batch, "fp32", dynamic_batch=max_batch > 1, max_batch=max_batch)
    low = precision != "fp32"
    gpu = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    built = torch_tensorrt.dynamo.compile(
        program, arg_inputs=inputs, device=gpu, disable_tf32=not tf32, min_block_size=1,
        enable_autocast=low, autocast_low_precision_type=check_precision(precision) if low else None)

    def save(tmp: pathlib.Path) -> None:
        torch_tensorrt.save(built, str(tmp / "engine.ep"), output_format="exported_program",
                            arg_inputs=inputs, retrace=True)

    _build_into(folder, key, save)
    return _NamedOutputs(built), path, False


def build_runtime(model: torch.nn.Module, runtime: str = "eager", input_size: tuple[int, int] = (192, 640),
                  precision: str = "fp32", device: torch.device | str = "cpu", max_batch: int = 1,
                  cache_dir: Optional[str | pathlib.Path] = None, tf32: bool = True) -> Runtime:
    """`model` (put in eval mode by the caller, on `device`) as `runtime`. Unknown runtime: ValueError listing the
    choices; one that cannot run here: RuntimeUnavailable (a ValueError) saying what to install
    or choose. `tf32` (CUDA): whether TensorRT may use TF32 for fp32 layers; eager / compile
    take the caller's math mode (DepthEstimator's cuda_math_mode)."""
    check_runtime(runtime)
    check_precision(precision)
    device = torch.device(device)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    h, w = input_size
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise ValueError(f"network input size must be positive multiples of 32, got {h}x{w}")
    size = (int(h), int(w))
    if runtime == "eager":
        return Runtime("eager", model, size, precision, device, max_batch, autocast=True)
    if runtime == "compile":
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on GPU
        return Runtime("compile", torch.compile(model, mode=mode, dynamic=False), size, precision,
                       device, max_batch, autocast=True)
    if getattr(model, "cfg", None) is None:
        raise ValueError(f"runtime {runtime} exports the model and needs a DiffSQLDepth (with .cfg)")
    if runtime == "onnxruntime":
        module, path, cached = _onnxruntime(model, size, precision, device, max_batch, cache_dir)
    else:
        module, path, cached = _tensorrt(model, size, precision, device, max_batch, tf32, cache_dir)
    return Runtime(runtime, module, size, precision, device, max_batch, autocast=False,
                   cache_path=path, from_cache=cached)
