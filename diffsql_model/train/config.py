"""Training configuration (`diffsql-train --config X.yaml`): one dataclass per concern.

Defaults follow the Monodepth2/SQLdepth recipe the paper trains with (PROTOCOLS.md, "Training"):
Adam lr 1e-4, lr x0.1 after 15 epochs, frames (0, -1, +1), frozen SD features.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional

import yaml

from ..config import ModelConfig, check_sd_weights
from ..device import PRECISIONS
from ..losses import LossConfig
from ..pose_net import POSE_PRIORS
from ..presets import get_preset
from ..yaml_config import ConfigError, YamlConfig

DATA_KINDS = ("kitti", "bag", "folder")


@dataclasses.dataclass
class ModelSection(YamlConfig):
    """Which DepthNet to train: a preset plus field overrides, or a full ModelConfig."""

    preset: Optional[str] = "lite"
    # ModelConfig fields to change on top of the preset, e.g. {height: 96, width: 320, sd: {timestep: 1}}.
    overrides: dict = dataclasses.field(default_factory=dict)
    config: Optional[ModelConfig] = None  # wins over preset + overrides when given
    pose_layers: int = 18  # PoseNet ResNet depth
    pose_weights: str = "none"  # "none" | "imagenet" (local torch cache only)
    pose_prior: str = "forward"  # PoseNet's initial motion (pose_net.POSE_PRIORS): forward | none

    def __post_init__(self):
        if self.config is None and not self.preset:
            raise ConfigError("model: give either a preset name or a full config")
        if self.pose_prior not in POSE_PRIORS:
            raise ConfigError(f"model.pose_prior must be one of {sorted(POSE_PRIORS)}, got {self.pose_prior!r}")


@dataclasses.dataclass
class DataConfig(YamlConfig):
    """Where training and validation samples come from (image size comes from the model)."""

    kind: str = "kitti"
    root: str = ""  # KITTI raw root / a bag / an image folder
    train_split: Optional[str] = None  # split file ("<date>/<drive> <frame> <l|r>" lines for KITTI)
    val_split: Optional[str] = None  # validation frames with ground-truth depth
    val_root: Optional[str] = None  # root of the validation set (default: root)
    depth_root: Optional[str] = None  # KITTI depth ("improved GT") root for validation depth
    frame_ids: list = dataclasses.field(default_factory=lambda: [0, -1, 1])  # 0 first; "s" = stereo
    val_max_frames: int = 200  # cap on validation frames evaluated per validation round
    val_crop: str = "garg"  # "garg" (KITTI Eigen crop) | "none"
    camera_topic: Optional[str] = None  # bags only
    options: dict = dataclasses.field(default_factory=dict)  # extra keyword args for the training set
    val_options: dict = dataclasses.field(default_factory=dict)  # ... for the validation set (bags)

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"data.kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if self.val_crop not in ("garg", "none"):
            raise ConfigError(f"data.val_crop must be 'garg' or 'none', got {self.val_crop!r}")
        ids = [("s" if str(f) == "s" else int(f)) for f in self.frame_ids]
        if not ids or ids[0] != 0:
            raise ConfigError(f"data.frame_ids must start with 0 (the target frame), got {self.frame_ids}")
        if len(set(ids)) != len(ids) or len(ids) < 2:
            raise ConfigError(f"data.frame_ids needs 0 and at least one distinct source, got {self.frame_ids}")
        self.frame_ids = ids

    @property
    def stereo(self) -> bool:
        return "s" in self.frame_ids

    @property
    def temporal_ids(self) -> list[int]:
        return [f for f in self.frame_ids[1:] if f != "s"]


@dataclasses.dataclass
class OptimConfig(YamlConfig):
    """Adam + step LR; `max_steps` / `time_budget_s` bound short runs (CPU smoke tests, demo)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 12  # per process (DDP: global batch = batch_size x world size)
    epochs: int = 20
    lr_step_epochs: int = 15  # multiply lr by lr_gamma every lr_step_epochs epochs
    lr_gamma: float = 0.1
    max_steps: int = 0  # 0: no step limit
    time_budget_s: float = 0.0  # 0: no time limit; counts training time only (not start-up)
    grad_clip: float = 0.0  # 0: no clipping

    def __post_init__(self):
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1 or self.lr_step_epochs < 1:
            raise ConfigError("optim: lr > 0, batch_size >= 1, epochs >= 1, lr_step_epochs >= 1 required")


@dataclasses.dataclass
class RuntimeConfig(YamlConfig):
    device: str = "auto"  # auto | cpu | cuda | cuda:N (DDP: cuda:LOCAL_RANK)
    precision: str = "fp32"  # autocast dtype for forward passes: fp32 | bf16 | fp16
    num_workers: int = 2
    seed: int = 0
    checkpoint_every: int = 500  # steps between last.pt writes (a SIGKILL loses at most this many)
    val_every: int = 2000  # steps between validations (also run at the end); 0: only at the end
    log_every: int = 20  # steps between TensorBoard scalars
    image_every: int = 500  # steps between TensorBoard image grids; 0: never
    log_dir: str = "runs/train"  # output folder (checkpoints, TensorBoard, resolved config)
    progress: bool = True  # tqdm bar on rank 0
    # Steps between the ranks' agreement on stopping (time budget, non-finite loss; also at every
    # checkpoint / validation step and the last): the only steps that wait for the device.
    sync_every: int = 10

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"runtime.precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.checkpoint_every < 1:
            raise ConfigError("runtime.checkpoint_every must be >= 1")
        if self.sync_every < 1:
            raise ConfigError("runtime.sync_every must be >= 1")


@dataclasses.dataclass
class TrainConfig(YamlConfig):
    name: str = "train"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    def with_overrides(self, overrides: list[str]):
        """Like YamlConfig.with_overrides, plus `model.<ModelConfig field>=v` shorthands that land
        in model.overrides (e.g. `--set model.height=96`)."""
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        own = {f.name for f in dataclasses.fields(ModelSection)}
        plain, routed = [], {}
        for item in overrides:
            key = item.split("=", 1)[0].strip()
            parts = key.split(".")
            if "=" in item and parts[0] == "model" and len(parts) >= 2 and parts[1] not in own \
                    and parts[1] in model_fields:
                node = routed
                for p in parts[1:-1]:
                    node = node.setdefault(p, {})
                node[parts[-1]] = yaml.safe_load(item.split("=", 1)[1])
            else:
                plain.append(item)
        cfg = YamlConfig.with_overrides(self, plain) if plain else self
        if routed:
            data = cfg.to_dict()
            data["model"]["overrides"] = _deep_merge(data["model"].get("overrides") or {}, routed)
            cfg = type(self).from_dict(data)
        return cfg


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_model_config(section: ModelSection) -> ModelConfig:
    """The ModelConfig a ModelSection describes (preset + overrides, or the full config)."""
    if section.config is not None:
        cfg = section.config
    else:
        base = get_preset(section.preset).to_dict()
        merged: dict[str, Any] = _deep_merge(base, section.overrides or {})
        try:
            cfg = ModelConfig.from_dict(merged)
        except ConfigError as e:
            raise ConfigError(f"model.overrides on preset {section.preset!r}: {e}") from None
    check_sd_weights(cfg.sd)
    return cfg


def check_uncertainty_training(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """The trained uncertainty head and its teacher go together (uncertainty.py), checked at load."""
    teacher = cfg.loss.uncertainty_teacher
    if model_cfg.uncertainty == "head" and not teacher:
        raise ConfigError("model.uncertainty: head is trained by self-teaching: set loss.uncertainty_teacher "
                          "to a trained checkpoint of this recipe (trained with another runtime.seed)")
    if teacher and model_cfg.uncertainty != "head":
        raise ConfigError("loss.uncertainty_teacher is set but model.uncertainty is "
                          f"{model_cfg.uncertainty!r}: set model.uncertainty=head to train the head")
    if teacher and not pathlib.Path(teacher).expanduser().is_file():
        raise ConfigError(f"loss.uncertainty_teacher: no checkpoint file at {teacher}")
