"""Stable Diffusion feature extractor (paper section 3.1, Fig. 3; coarse tokens of section 3.2).

One pass: image -> VAE encoder latent (distribution mean x scaling_factor) -> one UNet pass at a
small timestep with the empty-prompt (null-text) conditioning. Forward hooks collect the ResNet
outputs (local) and attention outputs (global) of the down, mid and up blocks; `sd_fusion` turns
them into the diffusion-augmented feature map. The output of the block named by `SDConfig.layer`
is also returned as tokens B x L x C (the coarse queries of the dynamic self-query layer).

No noise is added to the latent: we want features of the image itself, deterministic for a
given image (same image, same depth), and at t = 1 SD's noise level sqrt(1 - alpha_bar) ~ 0.03
is negligible anyway; the UNet at a small timestep reads its input as an almost clean latent.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from .config import SDConfig, check_sd_weights
from .device import sd_dtypes
from .sd_fusion import STAGES, DiffusionFeatureFusion
from .sd_weights import build_sd_modules, load_sd_folder, place, weights_fingerprint

log = logging.getLogger(__name__)

CLIP_CONTEXT_LENGTH = 77  # SD v1.x prompt length, used for the zero conditioning fallback

def _autocast_off(device_type: str):
    """Autocast disabled on this device (meta tensors, used for sizing, have no autocast)."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _compute_dtype(device_type: str, weight_dtype: torch.dtype) -> torch.dtype:
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight_dtype


class _Recorder:
    """Forward hook storing a module's output under `name` (an object, not a closure, so that
    deepcopy/pickle of the extractor rebinds it to the copy's own store)."""

    def __init__(self, store: Dict[str, torch.Tensor], name: str):
        self.store, self.name = store, name

    def __call__(self, module, inputs, output):
        if isinstance(output, tuple):  # attention (return_dict=False) and down blocks
            output = output[0]
        elif hasattr(output, "sample"):
            output = output.sample
        self.store[self.name] = output


def _downsamplings(blocks, attr: str) -> int:
    return sum(1 for b in blocks if getattr(b, attr, None) is not None)


class DiffusionFeatureExtractor(nn.Module):
    """Frozen (by default) SD v1.5 feature extractor + trainable fusion convs.

    forward(image B x 3 x H x W in [0, 1], any H, W) -> {
        "features": B x cfg.channels x ceil(H/8) x ceil(W/8),
        "tokens":   B x L x token_channels, L = ceil(H/s) * ceil(W/s), s = token_stride}
    Inputs are padded (replicate) to a multiple of `pad_multiple` (64 for SD) inside; outputs
    are cropped back. Without a CLIP text encoder the conditioning is zeros of shape
    1 x 77 x cross_attention_dim (logged).
    """

    def __init__(self, cfg: SDConfig, vae: AutoencoderKL, unet: UNet2DConditionModel,
                 null_text: Optional[torch.Tensor] = None):
        super().__init__()
        if unet.mid_block is None:
            raise ValueError("the SD UNet has no mid block; the 'latent' stage needs one")
        self.cfg = cfg
        self.frozen = cfg.frozen
        self.weights_seed: Optional[int] = None  # set when built from a seed (see from_config)
        self.weights_fingerprint: Optional[float] = None
        device = next(unet.parameters()).device
        # A buffer, not a Python int: no host-to-device copy (and sync) per forward, and CUDA
        # graphs can capture it. Not persistent: checkpoints keep their keys.
        self.register_buffer("timestep", torch.tensor(cfg.timestep, dtype=torch.long, device=device),
                             persistent=False)
        # Only encoding is used: the VAE decoder (~50 M params in v1.5) and the UNet's output
        # head go. The head must go for unfrozen SD: parameters without gradients break DDP.
        vae.decoder = None
        vae.post_quant_conv = None
        unet.conv_norm_out, unet.conv_act, unet.conv_out = None, None, nn.Identity()
        self.vae, self.unet = vae, unet
        cross_dim = unet.config.cross_attention_dim
        if null_text is None:
            log.info("SD conditioning: zeros 1 x %d x %d (no CLIP text encoder given)",
                     CLIP_CONTEXT_LENGTH, cross_dim)
            null_text = torch.zeros(1, CLIP_CONTEXT_LENGTH, cross_dim)
        if null_text.dim() != 3 or null_text.shape[0] != 1 or null_text.shape[-1] != cross_dim:
            raise ValueError(f"null_text must be 1 x L x {cross_dim} (UNet cross_attention_dim), "
                             f"got {tuple(null_text.shape)}")
        self.register_buffer("null_text", null_text.to(device, unet.dtype))

        self.latent_factor = 2 ** _downsamplings(vae.encoder.down_blocks, "downsamplers")
        mid_stride = self.latent_factor * 2 ** _downsamplings(unet.down_blocks, "downsamplers")
        self.pad_multiple = mid_stride

        # Hook points: last ResNet (local) and last attention (global) of every block per stage.
        self._captured: Dict[str, torch.Tensor] = {}
        self._stage_names: Dict[str, Tuple[List[str], List[str]]] = {}
        stage_channels = {}
        blocks = {"encoder": list(unet.down_blocks), "latent": [unet.mid_block],
                  "decoder": list(unet.up_blocks)}
        for stage in STAGES:
            names, chans = ([], []), ([], [])
            for i, block in enumerate(blocks[stage]):
                parts = [("local", block.resnets[-1])]
                if getattr(block, "attentions", None):
                    parts.append(("global", block.attentions[-1]))
                for kind, module in parts:
                    k = 0 if kind == "local" else 1
                    name = f"{stage}.{kind}.{i}"
                    module.register_forward_hook(_Recorder(self._captured, name))
                    names[k].append(name)
                    chans[k].append(module.out_channels)
            self._stage_names[stage] = names
            stage_channels[stage] = chans

        # Coarse tokens (section 3.2): mid0 = mid block output, upK = output of up_blocks[K].
        if cfg.layer == "mid0":
            token_block, self.token_stride = unet.mid_block, mid_stride
        else:
            k = int(cfg.layer[2:])
            token_block = unet.up_blocks[k]
            self.token_stride = mid_stride // 2 ** _downsamplings(unet.up_blocks[:k + 1], "upsamplers")
        token_block.register_forward_hook(_Recorder(self._captured, "tokens"))
        self.token_channels = token_block.resnets[-1].out_channels

        self.fusion = DiffusionFeatureFusion(stage_channels, cfg.channels)
        self.out_channels = cfg.channels
        for p in list(vae.parameters()) + list(unet.parameters()):
            p.requires_grad_(not self.frozen)
        self.train(self.training)

    @classmethod
    def from_config(cls, cfg: SDConfig, device=None, precision: str = "fp32",
                    seed: Optional[int] = None) -> "DiffusionFeatureExtractor":
        """Load `cfg.pretrained_path` (local diffusers folder) or build `cfg.arch` with random
        weights, straight onto `device`. Frozen SD is kept in the run `precision`'s dtypes
        (`device.sd_dtypes`): autocast then never re-casts its weights; trainable SD stays fp32.
        device="meta" builds the architecture without allocating (sizing, shapes). Random weights
        come from `seed`, by default one draw from the caller's RNG (seeded runs reproduce)."""
        dtypes = sd_dtypes(precision) if cfg.frozen else (torch.float32, torch.float32)
        meta = device is not None and torch.device(device).type == "meta"
        if cfg.pretrained_path:
            if meta:
                raise ValueError("a pretrained SD folder cannot be loaded on the meta device")
            vae, unet, null_text = load_sd_folder(cfg.pretrained_path, device, dtypes)
            return cls(cfg, vae, unet, null_text).to(device or "cpu")
        if meta:
            vae, unet = build_sd_modules(cfg.arch, "meta")
            with torch.device("meta"):
                return cls(cfg, vae, unet)
        check_sd_weights(cfg)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        vae, unet = build_sd_modules(cfg.arch, "cpu", seed)
        fingerprint = weights_fingerprint(vae, unet)
        vae, unet = place(vae, device, dtypes[0]), place(unet, device, dtypes[1])
        with torch.device(device) if device is not None else contextlib.nullcontext():
            ext = cls(cfg, vae, unet)
        ext.weights_seed, ext.weights_fingerprint = seed, fingerprint
        return ext

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # frozen SD stays in eval mode
            self.vae.eval()
            self.unet.eval()
        return self

    def encode_latent(self, image: torch.Tensor) -> torch.Tensor:
        """VAE latent of an image in [0, 1]: posterior mean x scaling_factor (B x 4 x H/8 x W/8),
        float32. Runs in the VAE's own dtype whatever the caller's autocast: diffusers marks the SD
        VAE force_upcast because its fp16 activations overflow to inf/NaN."""
        with _autocast_off(image.device.type):
            x = image.to(self.vae.dtype) * 2.0 - 1.0
            mean = self.vae.encode(x).latent_dist.mean  # the mean, not a sample: deterministic
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (mean.float() - shift) * self.vae.config.scaling_factor

    def _run_unet(self, latent: torch.Tensor) -> None:
        """One UNet pass filling the hooks. Frozen SD runs in its own (run) dtype without autocast;
        trainable SD keeps fp32 weights and runs under the caller's autocast."""
        own_dtype = _autocast_off(latent.device.type) if self.frozen else contextlib.nullcontext()
        with own_dtype:
            cond = self.null_text.to(self.unet.dtype).expand(latent.shape[0], -1, -1)
            self.unet(latent.to(self.unet.dtype), self.timestep, encoder_hidden_states=cond,
                      return_dict=False)

    def forward(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be B x 3 x H x W, got {tuple(image.shape)}")
        b, _, h, w = image.shape
        m = self.pad_multiple
        hp, wp = math.ceil(h / m) * m, math.ceil(w / m) * m
        if (hp, wp) != (h, w):
            image = F.pad(image, (0, wp - w, 0, hp - h), mode="replicate")

        self._captured.clear()
        try:
            grad = torch.is_grad_enabled() and not self.frozen
            with torch.set_grad_enabled(grad):  # frozen: no activations kept for backward
                latent = self.encode_latent(image)
                self._run_unet(latent)
            # Hook outputs (SD dtype) go to the dtype the fusion convs compute in: the autocast
            # dtype where autocast is on, else their weights' (fp32).
            dtype = _compute_dtype(image.device.type, self.fusion.combine.weight.dtype)
            feats = {s: tuple([self._captured[n].to(dtype) for n in names] for names in pair)
                     for s, pair in self._stage_names.items()}
            tokens = self._captured["tokens"].to(dtype)
        finally:
            self._captured.clear()

        features = self.fusion(feats, tuple(latent.shape[-2:]))  # B x C x hp/8 x wp/8
        f = self.latent_factor
        features = features[..., :math.ceil(h / f), :math.ceil(w / f)]
        s = self.token_stride
        tokens = tokens[..., :math.ceil(h / s), :math.ceil(w / s)]
        return {"features": features, "tokens": tokens.flatten(2).transpose(1, 2)}
