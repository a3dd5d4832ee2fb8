"""Export a trained DepthNet, SD models included, for deployment: a torch.export program (.pt2)
or an ONNX model (.onnx, the dynamo exporter) for ONNX Runtime, trtexec and other engines.

    diffsql-export CHECKPOINT OUT.pt2|OUT.onnx [--height 192 --width 640 --batch 1
                   --dynamic-batch --device cpu|cuda --precision fp32|bf16|fp16 --sd-path DIR]
The file has a fixed image size B x 3 x height x width (B = --batch, or 1..any with
--dynamic-batch), runs on the device it was exported on, and carries its ModelConfig (YAML:
a .pt2 extra file, ONNX metadata_props) so a robot loads it without the checkpoint. Outputs:
depth, uncertainty (B x 1 x h x w) and bin_centers (B x D), float32.

SD models: non-strict torch.export runs the SD extractor's forward hooks as Python while it
traces, so the UNet activations they collect enter the graph like any other tensor. Precision:
the model's frozen SD is in the dtypes it was loaded with (load_model(precision=...)); a bf16 /
fp16 .pt2 of a model without SD also traces the rest under autocast (with SD, the rest stays
fp32: nested autocast regions do not serialize). ONNX is fp32 (the ONNX exporter cannot lower
autocast regions): engines built from it choose their own precision (trtexec --fp16).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import pathlib
from typing import Iterator

import torch
import yaml
from torch.export import Dim

from .checkpoint import load_model
from .config import ModelConfig
from .device import check_precision, resolve_device
from .errors import CheckpointError

CONFIG_ENTRY = "model_config.yaml"
OUTPUTS = ("depth", "uncertainty", "bin_centers")
INPUT_NAME = "image"
SUFFIXES = (".pt2", ".onnx")
ORT_PIN = "onnxruntime==1.31.1 (requirements.txt; onnxruntime-gpu==1.31.1 in requirements-gpu.txt)"

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """A model that cannot be exported, or an exported file that cannot be read back."""


class _Outputs(torch.nn.Module):
    """The model as exported: image -> {depth, uncertainty, bin_centers} in float32, the network
    under autocast(dtype) when a low precision is asked for (export ignores the caller's)."""

    def __init__(self, model: torch.nn.Module, precision: str):
        super().__init__()
        self.model, self.dtype = model, check_precision(precision)
        self.autocast = precision != "fp32"

    def forward(self, image: torch.Tensor) -> dict:
        # No autocast block at all in fp32: a disabled one around the SD extractor's own
        # (autocast off) nests two autocast regions, which .pt2 serialization cannot read back.
        ctx = torch.autocast(image.device.type, dtype=self.dtype) if self.autocast else contextlib.nullcontext()
        with ctx:
            out = self.model(image)
        return {k: out[k].float() for k in OUTPUTS}


@contextlib.contextmanager
def _module_attributes_kept(model: torch.nn.Module) -> Iterator[None]:
    """Non-strict torch.export snapshots every module's plain attributes through pytree and
    writes copies back: a dict shared with forward hooks (the SD extractor's activation store)
    is replaced by a copy the hooks no longer fill, and the eager model's next forward fails.
    Put the original objects back."""
    saved = [(m, dict(vars(m))) for m in model.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            vars(m).update(attrs)


def trace(model: torch.nn.Module, height: int, width: int, batch: int = 1, precision: str = "fp32",
          dynamic_batch: bool = False, max_batch: int | None = None) -> torch.export.ExportedProgram:
    """`model` (eval mode, no grad) traced at batch x 3 x height x width on its own device ->
    ExportedProgram returning {depth, uncertainty, bin_centers}. `dynamic_batch`: batches
    1..max_batch (default any; traced at max(batch, 2): a size-1 example fixes the batch at 1)."""
    if height <= 0 or width <= 0 or batch <= 0:
        raise ExportError(f"export size must be positive, got batch {batch}, {height}x{width}")
    device = next(model.parameters()).device
    wrapped = _Outputs(model, precision)
    example = torch.rand(max(batch, 2) if dynamic_batch else batch, 3, height, width, device=device)
    shapes = ({0: Dim("batch", min=1, max=max_batch)},) if dynamic_batch else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _module_attributes_kept(model):
            return torch.export.export(wrapped, (example,), dynamic_shapes=shapes, strict=False)
    finally:
        model.train(was_training)


def export_depth_net(model: torch.nn.Module, cfg: ModelConfig, path: str | pathlib.Path,
                     height: int | None = None, width: int | None = None, batch: int = 1,
                     precision: str = "fp32", dynamic_batch: bool = False) -> pathlib.Path:
    """Trace `model` on its device and write `path` (.pt2 or .onnx) with `cfg` inside."""
    path = pathlib.Path(path)
    if path.suffix not in SUFFIXES:
        raise ExportError(f"export path must end in one of {SUFFIXES}, got {path.name!r}")
    if path.suffix == ".onnx" and precision != "fp32":
        raise ExportError(f"ONNX export is fp32 only (got {precision}): the ONNX exporter cannot lower "
                          "autocast regions; build a low-precision engine from the fp32 file "
                          "(e.g. trtexec --fp16) or export .pt2")
    has_sd = getattr(model, "sd", None) is not None
    if has_sd != cfg.sd.enabled:  # the file's config would describe another model
        raise ExportError(f"the config says SD features {'on' if cfg.sd.enabled else 'off'} "
                          f"(sd.enabled) but the model has {'them' if has_sd else 'none'}: pass the model's own config")
    if cfg.sd.enabled and precision != "fp32":
        raise ExportError(f"SD models export with precision fp32 only (got {precision}): torch.export "
                          "cannot serialize the SD extractor's autocast-off regions inside an autocast "
                          "region. Load the model in the low precision (frozen SD in its dtypes) and "
                          "export it with precision fp32 (diffsql-export does)")
    height, width = height or cfg.height, width or cfg.width
    program = trace(model, height, width, batch, precision, dynamic_batch)
    config_yaml = yaml.safe_dump(cfg.to_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt2":
        torch.export.save(program, path, extra_files={CONFIG_ENTRY: config_yaml})
        return path
    onnx_program = torch.onnx.export(program, program.example_inputs[0], dynamo=True, input_names=[INPUT_NAME],
                                     output_names=list(OUTPUTS), optimize=True, verbose=False)
    onnx_program.model.metadata_props[CONFIG_ENTRY] = config_yaml
    onnx_program.save(path)  # weights in a side file only past ONNX's 2 GB protobuf limit
    return path


class OnnxModule:
    """An exported .onnx run by ONNX Runtime: image B x 3 x h x w -> {depth, uncertainty,
    bin_centers} as torch tensors on the image's device. CUDAExecutionProvider for `device`
    cuda where this onnxruntime has it (onnxruntime-gpu), else CPU; the tensors go through the
    host either way (the GPU fast path is the tensorrt runtime). `threads`: ONNX Runtime's
    intra-op threads (default: torch's)."""

    def __init__(self, path: str | pathlib.Path, device: torch.device | str = "cpu", threads: int | None = None):
        try:
            import onnxruntime as ort  # optional at run time: only this path needs it
        except ImportError:
            raise ExportError(f"running an .onnx model needs onnxruntime: pip install {ORT_PIN}") from None
        device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                log.warning("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu from "
                            "requirements-gpu.txt): running %s on the CPU", path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ExportError(f"{path} is not a readable ONNX model: {e}") from None
        self.providers = self.session.get_providers()
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, image: torch.Tensor) -> dict:
        arrays = self.session.run(None, {INPUT_NAME: image.detach().float().cpu().numpy()})
        return {name: torch.from_numpy(a).to(image.device) for name, a in zip(self._outputs, arrays)}


def load_exported(path: str | pathlib.Path, device: torch.device | str = "cpu"):
    """(callable: image -> {"depth", "uncertainty", "bin_centers"}, ModelConfig). A .pt2 runs
    on the device it was exported on; an .onnx on `device` through ONNX Runtime."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ExportError(f"exported model not found: {path}")
    if path.suffix == ".onnx":
        module = OnnxModule(path, device)
        text = module.metadata.get(CONFIG_ENTRY, "")
    else:
        extra = {CONFIG_ENTRY: ""}
        try:
            program = torch.export.load(path, extra_files=extra)
        except Exception as e:
            raise ExportError(f"{path} is not a readable torch.export program: {e}") from None
        module, text = program.module(), extra[CONFIG_ENTRY]
    if not text:
        raise ExportError(f"{path} carries no {CONFIG_ENTRY}: not written by export_depth_net")
    return module, ModelConfig.from_dict(yaml.safe_load(text))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Export a DepthNet checkpoint to .pt2 (torch.export) or .onnx")
    ap.add_argument("checkpoint")
    ap.add_argument("out", help="output file, .pt2 or .onnx")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dynamic-batch", action="store_true", help="any batch size at run time")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: the device the file runs on")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                    help="frozen SD dtypes; for .pt2 without SD also the network's autocast dtype")
    ap.add_argument("--sd-path", default=None, help="local SD folder for checkpoints that do not store it")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.precision == "fp16" and device.type == "cpu":
        ap.error("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    try:
        model, cfg = load_model(args.checkpoint, device, sd_path=args.sd_path, precision=args.precision)
        # The autocast of the rest: .onnx and SD models trace fp32 (frozen SD in the load dtypes).
        traced = "fp32" if cfg.sd.enabled or args.out.endswith(".onnx") else args.precision
        out = export_depth_net(model, cfg, args.out, args.height, args.width, args.batch,
                               traced, args.dynamic_batch)
    except (ExportError, CheckpointError) as e:
        raise SystemExit(f"diffsql-export: {e}") from None
    size = f"{args.height or cfg.height}x{args.width or cfg.width}"
    print(f"wrote {out} ({cfg.backbone}, SD {'on' if cfg.sd.enabled else 'off'}, {size}, "
          f"batch {'dynamic' if args.dynamic_batch else args.batch}, SD weights {args.precision} if any, "
          f"network {traced}, {device})")


if __name__ == "__main__":
    main()
