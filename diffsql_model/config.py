"""Model configuration: one dataclass per concern, loadable from YAML, stored in checkpoints."""
from __future__ import annotations

import dataclasses
from typing import Optional

from .yaml_config import ConfigError, YamlConfig

BACKBONES = ("resnet18", "resnet50")
QUERY_MODES = ("none", "fixed", "dynamic")
SD_LAYERS = ("mid0", "up1", "up0")
SD_ARCHS = ("v1.5", "tiny")
# `bins`: std of Eq. 10's bin distribution (training-free); `head`: a trained log-uncertainty
# head (uncertainty.py), trained by self-teaching (loss.uncertainty_teacher).
UNCERTAINTY_SOURCES = ("bins", "head")


@dataclasses.dataclass
class SDConfig(YamlConfig):
    """Stable Diffusion feature extractor (paper section 3.1)."""

    enabled: bool = False
    # Local diffusers folder with vae/ and unet/ (and optionally text_encoder/ + tokenizer/).
    # None: build the architecture `arch` from its config with random weights (tests, sizing).
    pretrained_path: Optional[str] = None
    arch: str = "v1.5"
    timestep: int = 1
    layer: str = "up0"  # SD block whose output tokens become the coarse queries H (section 3.2)
    frozen: bool = True
    channels: int = 128  # channels of the fused diffusion-augmented feature map
    # A full-size SD without pretrained_path has no diffusion prior: an error unless asked for
    # (benchmarks, sizing). The tiny test arch never has weights and needs no flag.
    allow_random_weights: bool = False

    def __post_init__(self):
        if self.arch not in SD_ARCHS:
            raise ConfigError(f"sd.arch must be one of {SD_ARCHS}, got {self.arch!r}")
        if self.layer not in SD_LAYERS:
            raise ConfigError(f"sd.layer must be one of {SD_LAYERS}, got {self.layer!r}")
        if self.timestep < 0:
            raise ConfigError("sd.timestep must be >= 0")


def check_sd_weights(sd: SDConfig) -> None:
    """Refuse a full-size SD that would run on random weights: days of GPU time without the
    diffusion prior. Called when a config is loaded, before any data or weights are read."""
    if sd.enabled and sd.arch != "tiny" and not sd.pretrained_path and not sd.allow_random_weights:
        raise ConfigError(
            f"sd.pretrained_path is not set: the SD {sd.arch} model would start from random weights. "
            "Set sd.pretrained_path to a local diffusers Stable Diffusion folder (vae/, unet/, "
            "optionally text_encoder/ + tokenizer/), e.g. --set model.sd.pretrained_path=/data/sd-v1-5, "
            "or set sd.allow_random_weights: true for speed or memory measurements")


@dataclasses.dataclass
class ModelConfig(YamlConfig):
    """DepthNet: ResNet encoder-decoder (+ SD features) + Dynamic Self-Query Layer."""

    backbone: str = "resnet18"
    weights: str = "none"  # "none" | "imagenet" (local torch cache only) | path to a .pth
    height: int = 192  # network input size; inputs of other sizes are resized to it
    width: int = 640
    model_dim: int = 32  # channels of the decoder feature map S (H/2 x W/2)
    num_queries: int = 64  # K coarse queries
    num_bins: int = 64  # D depth bins / planes
    patch_size: int = 16  # token patches of S when SD is off (SQLdepth-style coarse tokens)
    query_mode: str = "dynamic"
    min_depth: float = 0.1
    max_depth: float = 80.0
    uncertainty: str = "bins"  # UNCERTAINTY_SOURCES: what the "uncertainty" output is
    sd: SDConfig = dataclasses.field(default_factory=SDConfig)

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.query_mode not in QUERY_MODES:
            raise ConfigError(f"query_mode must be one of {QUERY_MODES}, got {self.query_mode!r}")
        if self.uncertainty not in UNCERTAINTY_SOURCES:
            raise ConfigError(f"uncertainty must be one of {UNCERTAINTY_SOURCES}, got {self.uncertainty!r}")
        if not 0 < self.min_depth < self.max_depth:
            raise ConfigError(f"need 0 < min_depth < max_depth, got {self.min_depth}, {self.max_depth}")
        if self.height % 32 or self.width % 32:
            raise ConfigError(f"height and width must be multiples of 32, got {self.height}x{self.width}")
