"""Checkpoints: written atomically, read back with clear errors, carrying their model config."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
from typing import Any

import torch

from .config import ModelConfig
from .depth_net import DiffSQLDepth
from .errors import CheckpointError
from .pose_net import PoseNet
from .yaml_config import ConfigError

FORMAT = "diffsql-checkpoint-v1"


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


# "sd_weights" in a checkpoint: the frozen SD VAE/UNet/null-text are never stored (3.7 GB for
# v1.5): "external" = they come from the SD folder at load time, "seeded" = random weights rebuilt
# from "sd_seed" and checked against "sd_fingerprint"; "included" (trainable SD, or older files)
# = all in "model".
SD_EXTERNAL, SD_SEEDED, SD_INCLUDED = "external", "seeded", "included"
# The UNet output head, unused by the feature extractor and no longer built (older files have it).
_REMOVED_SD_KEYS = ("sd.unet.conv_norm_out.", "sd.unet.conv_out.")


def external_sd_keys(model: torch.nn.Module) -> list[str]:
    """state_dict keys of `model` that a checkpoint leaves out: the frozen SD weights (VAE, UNet,
    null-text buffer), loaded from a folder or built from a seed, both of which can make them
    again. Trainable SD: nothing (its weights changed)."""
    sd = getattr(model, "sd", None)
    if sd is None or not sd.frozen or not (sd.cfg.pretrained_path or sd.weights_seed is not None):
        return []
    # Everything under sd. except the trainable fusion convs.
    return [f"sd.{k}" for k in sd.state_dict() if not k.startswith("fusion.")]


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """Checkpoint entries for `model`'s weights: {"model": state_dict without the external SD
    keys, "sd_weights": ..., "sd_omitted_keys": [...]} (merge into the checkpoint dict)."""
    omitted = external_sd_keys(model)
    skip = set(omitted)
    weights = {k: v for k, v in model.state_dict().items() if k not in skip}
    if not omitted:
        return {"model": weights, "sd_weights": SD_INCLUDED, "sd_omitted_keys": []}
    if model.sd.cfg.pretrained_path:
        return {"model": weights, "sd_weights": SD_EXTERNAL, "sd_omitted_keys": omitted}
    return {"model": weights, "sd_weights": SD_SEEDED, "sd_omitted_keys": omitted,
            "sd_seed": model.sd.weights_seed, "sd_fingerprint": model.sd.weights_fingerprint}


def load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    """Load a checkpoint's "model" into `model` strictly. With external SD weights the model must
    already hold SD from its folder: its SD keys must be exactly the recorded ones, and every
    other key must match (no missing, no unexpected, no shape mismatch)."""
    weights = {k: v for k, v in state["model"].items() if not k.startswith(_REMOVED_SD_KEYS)}
    if state.get("sd_weights", SD_INCLUDED) == SD_INCLUDED:
        load_state_strict(model, weights, "model", path)
        return
    recorded = [k for k in state.get("sd_omitted_keys", []) if not k.startswith(_REMOVED_SD_KEYS)]
    have = external_sd_keys(model)
    if sorted(recorded) != sorted(have):
        diff = sorted(set(recorded) ^ set(have))[:5]
        raise CheckpointError(f"{path}: the SD folder's weights do not match the SD the checkpoint was "
                              f"trained with ({len(recorded)} keys recorded, {len(have)} in the folder's "
                              f"model; differing e.g. {diff})")
    if set(recorded) & set(weights):
        raise CheckpointError(f"{path}: marked sd_weights={state['sd_weights']} but stores SD weights too")
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches are raised even when strict=False
        first = str(e).splitlines()[:6]
        raise CheckpointError(f"{path}: model weights do not fit the model: " + " ".join(first)) from None
    missing = sorted(set(missing) - set(recorded))
    if missing or unexpected:
        raise CheckpointError(f"{path}: model weights do not fit the model: missing {missing[:8]}, "
                              f"unexpected {sorted(unexpected)[:8]}")


def load_model(path: str | pathlib.Path, device: str | torch.device = "cpu", sd_path=None,
               precision: str = "fp32"):
    """Rebuild the DepthNet from a checkpoint's stored `model_config`, load its weights strictly;
    returns (model in eval mode on `device`, ModelConfig). A checkpoint whose frozen SD weights are
    external loads them from `sd_path`, else from the stored `sd.pretrained_path` (the returned
    config names the folder used), onto `device` in the dtypes of the run `precision`; seeded SD
    is rebuilt from its seed. Every failure is a CheckpointError."""
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
    elif cfg.sd.enabled:  # seeded or stored in the file: no folder, no random-weights refusal
        build_cfg = dataclasses.replace(build_cfg, sd=dataclasses.replace(
            cfg.sd, pretrained_path=None, allow_random_weights=True))
    seed = state.get("sd_seed") if state.get("sd_weights") == SD_SEEDED else None
    try:
        model = DiffSQLDepth.from_config(build_cfg, device, precision, sd_seed=seed)
    except FileNotFoundError as e:  # SDFolderError: folder there but not a readable SD model
        raise CheckpointError(f"{path}: could not load the SD weights: {e}") from None
    if seed is not None:
        _check_fingerprint(model.sd.weights_fingerprint, state.get("sd_fingerprint"), path)
    elif model.sd is not None and not cfg.sd.pretrained_path:
        model.sd.weights_seed = None  # its weights come from the file, not from a seed
    load_model_state(model, state, path)
    return model.to(device).eval(), cfg


def load_pose_net(path: str | pathlib.Path, device: str | torch.device = "cpu") -> PoseNet:
    """The PoseNet a monocular run stored next to the depth network (eval mode on `device`);
    CheckpointError when the run had none (stereo-only training)."""
    state = load_checkpoint(path, map_location="cpu")
    if not isinstance(state.get("pose_net"), dict):
        raise CheckpointError(f"{path}: no PoseNet in this checkpoint (trained without frames -1 / +1?)")
    layers = ((state.get("train_config") or {}).get("model") or {}).get("pose_layers", 18)
    pose_net = PoseNet(layers)  # its weights come from the file: never the ImageNet cache
    load_state_strict(pose_net, state["pose_net"], "pose_net", path)
    return pose_net.to(device).eval()


def _check_fingerprint(rebuilt: float, recorded, path) -> None:
    if recorded is None or abs(rebuilt - float(recorded)) > 1e-9 * max(1.0, abs(float(recorded))):
        raise CheckpointError(
            f"{path}: the random SD weights rebuilt from the stored seed differ from the ones trained "
            f"with (fingerprint {rebuilt!r} vs {recorded!r}: another torch or diffusers version?); "
            "this checkpoint cannot be restored here")
