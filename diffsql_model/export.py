"""Export a trained DepthNet to a self-contained torch.export program (.pt2) for deployment.

    python -m diffsql_model.export CHECKPOINT OUT.pt2 [--height 192 --width 640]
The program has a fixed input size B x 3 x height x width (B = 1 unless --batch) and carries
its ModelConfig (YAML) inside, so a robot loads it without the checkpoint.
Models with SD features are not exportable: the SD extractor collects UNet activations with
forward hooks, which torch.export does not trace; run those eagerly (load_model).
"""
from __future__ import annotations

import argparse
import pathlib

import torch
import yaml

from .checkpoint import load_model
from .config import ModelConfig

CONFIG_ENTRY = "model_config.yaml"


class ExportError(RuntimeError):
    """A model that cannot be exported, or an exported file that cannot be read back."""


def export_depth_net(model: torch.nn.Module, cfg: ModelConfig, path: str | pathlib.Path,
                     height: int | None = None, width: int | None = None, batch: int = 1) -> pathlib.Path:
    """Trace `model` (eval mode, no grad) at batch x 3 x height x width; save program + config."""
    if cfg.sd.enabled:
        raise ExportError("models with SD features cannot be exported (forward hooks in the SD "
                          "extractor are not traceable); use diffsql_model.checkpoint.load_model")
    height, width = height or cfg.height, width or cfg.width
    device = next(model.parameters()).device
    example = torch.rand(batch, 3, height, width, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example,))
    finally:
        model.train(was_training)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path, extra_files={CONFIG_ENTRY: yaml.safe_dump(cfg.to_dict())})
    return path


def load_exported(path: str | pathlib.Path):
    """(callable module: image -> {"depth", "uncertainty", "bin_centers"}, ModelConfig)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ExportError(f"exported model not found: {path}")
    extra = {CONFIG_ENTRY: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as e:
        raise ExportError(f"{path} is not a readable torch.export program: {e}") from None
    if not extra[CONFIG_ENTRY]:
        raise ExportError(f"{path} carries no {CONFIG_ENTRY}: not written by export_depth_net")
    return program.module(), ModelConfig.from_dict(yaml.safe_load(extra[CONFIG_ENTRY]))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Export a DepthNet checkpoint to a .pt2 program")
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    model, cfg = load_model(args.checkpoint)
    out = export_depth_net(model, cfg, args.out, args.height, args.width, args.batch)
    print(f"wrote {out} ({cfg.backbone}, {args.height or cfg.height}x{args.width or cfg.width})")


if __name__ == "__main__":
    main()
