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


# "sd_weights" in a checkpoint: "external" = the frozen SD VAE/UNet/null-text are not stored and
# come from the SD folder at load time; "included" (or absent, older files) = all in "model".
SD_EXTERNAL, SD_INCLUDED = "external", "included"


def external_sd_keys(model: torch.nn.Module) -> list[str]:
    """state_dict keys of `model` that a checkpoint can leave out: the frozen SD weights (VAE,
    UNet, null-text buffer) when they were loaded from a folder that can load them again.
    Trainable SD, or SD built from its config without a folder: nothing (else unrestorable)."""
    sd = getattr(model, "sd", None)
    if sd is None or not sd.frozen or not sd.cfg.pretrained_path:
        return []
    # Everything under sd. except the trainable fusion convs.
    return [f"sd.{k}" for k in sd.state_dict() if not k.startswith("fusion.")]


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """Checkpoint entries for `model`'s weights: {"model": state_dict without the external SD
    keys, "sd_weights": ..., "sd_omitted_keys": [...]} (merge into the checkpoint dict)."""
    omitted = external_sd_keys(model)
    skip = set(omitted)
    weights = {k: v for k, v in model.state_dict().items() if k not in skip}
    return {"model": weights, "sd_weights": SD_EXTERNAL if omitted else SD_INCLUDED,
            "sd_omitted_keys": omitted}


def load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    """Load a checkpoint's "model" into `model` strictly. With external SD weights the model must
    already hold SD from its folder: its SD keys must be exactly the recorded ones, and every
    other key must match (no missing, no unexpected, no shape mismatch)."""
    if state.get("sd_weights", SD_INCLUDED) != SD_EXTERNAL:
        load_state_strict(model, state["model"], "model", path)
        return
    recorded, have = list(state.get("sd_omitted_keys", [])), external_sd_keys(model)
    if sorted(recorded) != sorted(have):
        diff = sorted(set(recorded) ^ set(have))[:5]
        raise CheckpointError(f"{path}: the SD folder's weights do not match the SD the checkpoint was "
                              f"trained with ({len(recorded)} keys recorded, {len(have)} in the folder's "
                              f"model; differing e.g. {diff})")
    if set(recorded) & set(state["model"]):
        raise CheckpointError(f"{path}: marked sd_weights=external but stores SD weights too")
    try:
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as e:  # shape mismatches are raised even when strict=False
        first = str(e).splitlines()[:6]
        raise CheckpointError(f"{path}: model weights do not fit the model: " + " ".join(first)) from None
    missing = sorted(set(missing) - set(recorded))
    if missing or unexpected:
        raise CheckpointError(f"{path}: model weights do not fit the model: missing {missing[:8]}, "
                              f"unexpected {sorted(unexpected)[:8]}")


def load_model(path: str | pathlib.Path, device: str | torch.device = "cpu", sd_path=None):
    """Rebuild the DepthNet from a checkpoint's stored `model_config`, load its weights strictly;
    returns (model in eval mode on `device`, ModelConfig). A checkpoint whose frozen SD weights are
    external loads them from `sd_path`, else from the stored `sd.pretrained_path` (the returned
    config names the folder used). Every failure is a CheckpointError."""
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
    if state.get("sd_weights") == SD_EXTERNAL:
        folder = sd_path or cfg.sd.pretrained_path
        if not folder or not pathlib.Path(folder).expanduser().is_dir():
            raise CheckpointError(
                f"{path}: this checkpoint does not store the frozen Stable Diffusion weights; they load "
                f"from the SD folder {str(folder)!r}, which does not exist here. Pass the local SD "
                f"folder (diffusers layout: vae/, unet/, text_encoder/, tokenizer/) with sd_path "
                f"(diffsql-eval/diffsql-bag-eval --sd-path, depth node parameter sd_path)")
        cfg = dataclasses.replace(cfg, sd=dataclasses.replace(cfg.sd, pretrained_path=str(folder)))
        build_cfg = dataclasses.replace(build_cfg, sd=cfg.sd)
    elif cfg.sd.enabled and any(k.startswith("sd.unet.") for k in state["model"]):
        build_cfg = dataclasses.replace(build_cfg, sd=dataclasses.replace(cfg.sd, pretrained_path=None))
    try:
        model = build_model(build_cfg)
    except FileNotFoundError as e:  # SDFolderError: folder there but not a readable SD model
        raise CheckpointError(f"{path}: could not load the SD weights: {e}") from None
    load_model_state(model, state, path)
    return model.to(device).eval(), cfg
