"""Checkpoints: written atomically, read back with clear errors, carrying their model config."""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any

import torch

FORMAT = "diffsql-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model asked for."""


def save_checkpoint(path: str | pathlib.Path, state: dict[str, Any]) -> pathlib.Path:
    """Write `state` (+ format tag) to `path` atomically: temp file in the same folder, fsync,
    rename. A kill at any moment leaves either the old file or the new one, never half of one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | pathlib.Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`; every failure is a `CheckpointError`
    naming the file and what is wrong with it."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint is data (tensors, dicts, numbers, strings), never code.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated/garbled files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a diffsql checkpoint (expected format {FORMAT!r}, "
            f"got {state.get('format') if isinstance(state, dict) else type(state).__name__!r})"
        )
    if "model_config" not in state or "model" not in state:
        raise CheckpointError(f"{path}: checkpoint lacks 'model_config' or 'model'")
    return state


def load_state_strict(module: torch.nn.Module, state_dict: dict, what: str, path) -> None:
    """`load_state_dict(strict=True)` with the mismatch turned into a readable CheckpointError."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:6]
        raise CheckpointError(f"{path}: {what} weights do not fit the model: " + " ".join(first)) from None


def build_model(cfg):
    """A `DiffSQLDepth` for the ModelConfig `cfg` (imported here: checkpoint.py stays light)."""
    from .depth_net import DiffSQLDepth

    return DiffSQLDepth(cfg)


def load_model(path: str | pathlib.Path, device: str | torch.device = "cpu"):
    """Rebuild the DepthNet from a checkpoint's stored `model_config`, load its weights strictly;
    returns (model in eval mode on `device`, ModelConfig). Every failure is a CheckpointError."""
    import dataclasses

    from .config import ModelConfig
    from .yaml_config import ConfigError

    state = load_checkpoint(path, map_location="cpu")
    try:
        cfg = ModelConfig.from_dict(state["model_config"])
    except (ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: stored model_config is invalid: {e}") from None
    if not isinstance(state["model"], dict):
        raise CheckpointError(f"{path}: 'model' is a {type(state['model']).__name__}, not a state dict")
    # The stored weights replace the initial ones: never fetch ImageNet weights, and when the SD
    # weights are stored too, build SD from its architecture instead of reading its folder.
    build_cfg = dataclasses.replace(cfg, weights="none")
    if cfg.sd.enabled and any(k.startswith("sd.unet.") for k in state["model"]):
        build_cfg = dataclasses.replace(build_cfg, sd=dataclasses.replace(cfg.sd, pretrained_path=None))
    model = build_model(build_cfg)
    load_state_strict(model, state["model"], "model", path)
    return model.to(device).eval(), cfg
