"""DiffSQL DepthNet: ResNet encoder (+ SD features) -> U-Net decoder -> Dynamic Self-Query Layer."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .decoder import UNetDecoder
from .encoder import ResNetEncoder
from .query_layer import DynamicSelfQueryLayer
from .uncertainty import UncertaintyHead, depth_std


class DiffSQLDepth(nn.Module):
    """forward(image B x 3 x H x W in [0, 1]) -> {"depth", "uncertainty"} (B x 1 x H x W, metres
    up to the model's scale; uncertainty a std: cfg.uncertainty says whose), "bin_centers" (B x D)
    and, with the trained head, "log_b" (B x 1 x H x W, uncertainty.py). Sides need not be multiples of 32: the
    image is padded inside and the outputs cropped back.

    `sd_device` / `precision`: where and in which run precision the (frozen) SD modules are
    loaded, so multi-GB weights go straight to the GPU in their final dtype; the rest is built
    in fp32 on the CPU (move it with `.to(device)`, which keeps the SD dtypes)."""

    def __init__(self, cfg: ModelConfig, sd_device=None, precision: str = "fp32",
                 sd_seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = ResNetEncoder(cfg.backbone, cfg.weights)
        self.sd = None
        sd_channels = token_channels = 0
        if cfg.sd.enabled:
            from .sd_features import DiffusionFeatureExtractor  # heavy (diffusers): only when used

            self.sd = DiffusionFeatureExtractor.from_config(cfg.sd, sd_device, precision, sd_seed)
            sd_channels, token_channels = self.sd.out_channels, self.sd.token_channels
        self.decoder = UNetDecoder(self.encoder.num_ch_enc, cfg.model_dim, sd_channels)
        self.query_layer = DynamicSelfQueryLayer(
            cfg.model_dim, cfg.num_queries, cfg.num_bins, cfg.min_depth, cfg.max_depth,
            query_mode=cfg.query_mode, token_channels=token_channels, patch_size=cfg.patch_size)
        self.uncertainty_head = UncertaintyHead(cfg.model_dim) if cfg.uncertainty == "head" else None

    @classmethod
    def from_config(cls, cfg: ModelConfig, device=None, precision: str = "fp32",
                    sd_seed: int | None = None) -> "DiffSQLDepth":
        """The model on `device` (default CPU), its frozen SD loaded there in the run `precision`."""
        model = cls(cfg, sd_device=device, precision=precision, sd_seed=sd_seed)
        return model.to(device) if device is not None else model

    def forward(self, image: torch.Tensor) -> dict:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"expected an image batch B x 3 x H x W, got {tuple(image.shape)}")
        H, W = image.shape[-2:]
        pad_h, pad_w = (-H) % 32, (-W) % 32
        if pad_h or pad_w:
            # Replicate, not zeros: a black border would read as a texture edge to the encoder.
            image = F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        feats = self.encoder(image)
        sd_out = self.sd(image) if self.sd is not None else None
        S = self.decoder(feats, sd_out["features"] if sd_out else None)  # B x E x H/2 x W/2
        out = self.query_layer(S, sd_out["tokens"] if sd_out else None)
        size = image.shape[-2:]
        # Bilinear weights are convex, so upsampled depth stays inside [min_depth, max_depth].
        depth = F.interpolate(out["depth"], size=size, mode="bilinear", align_corners=False)
        result = {"bin_centers": out["bin_centers"]}
        if self.uncertainty_head is not None:
            log_b = F.interpolate(self.uncertainty_head(S), size=size, mode="bilinear", align_corners=False)
            unc = depth_std(depth, log_b)
            result["log_b"] = log_b[..., :H, :W]
        else:
            unc = F.interpolate(out["uncertainty"], size=size, mode="bilinear", align_corners=False)
        result.update(depth=depth[..., :H, :W], uncertainty=unc[..., :H, :W])
        return result
