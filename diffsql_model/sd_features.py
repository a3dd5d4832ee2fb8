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
import pathlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from .config import SDConfig
from .sd_fusion import STAGES, DiffusionFeatureFusion

log = logging.getLogger(__name__)

CLIP_CONTEXT_LENGTH = 77  # SD v1.x prompt length, used for the zero conditioning fallback

# The published SD v1.5 architecture (runwayml/stable-diffusion-v1-5 vae/ and unet/ configs).
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)

LAYOUT_HELP = (
    "expected a local diffusers Stable Diffusion folder: <path>/vae/ and <path>/unet/ (each "
    "config.json + diffusion_pytorch_model.safetensors or .bin), optionally <path>/text_encoder/ "
    "+ <path>/tokenizer/ (CLIP) for the empty-prompt conditioning, e.g. a local copy of "
    "stable-diffusion-v1-5"
)


class SDFolderError(FileNotFoundError):
    """The pretrained Stable Diffusion folder is missing or unreadable."""


def build_sd_modules(arch: str, device=None) -> Tuple[AutoencoderKL, UNet2DConditionModel]:
    """Randomly initialised (vae, unet) of `arch` ("v1.5" | "tiny"); device="meta" allocates nothing."""
    from . import tiny_sd

    configs = {"v1.5": (SD15_VAE_CONFIG, SD15_UNET_CONFIG),
               "tiny": (tiny_sd.TINY_VAE_CONFIG, tiny_sd.TINY_UNET_CONFIG)}
    if arch not in configs:
        raise ValueError(f"unknown SD arch {arch!r}, expected one of {sorted(configs)}")
    vae_cfg, unet_cfg = configs[arch]
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return AutoencoderKL(**vae_cfg), UNet2DConditionModel(**unet_cfg)


@torch.no_grad()
def null_text_embedding(text_encoder, tokenizer) -> torch.Tensor:
    """CLIP last hidden state of the empty prompt padded to the context length: 1 x L x D."""
    length = tokenizer.model_max_length
    if not 0 < length <= 4096:  # tokenizers without a configured length report ~1e30
        length = text_encoder.config.max_position_embeddings
    ids = tokenizer([""], padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0].float().cpu()


def _load(cls, folder: pathlib.Path, **kwargs):
    if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise SDFolderError(f"{folder} is missing; {LAYOUT_HELP}")
    if not cls.__name__.endswith("Tokenizer"):
        weights = [f.name for f in folder.iterdir() if f.suffix in (".safetensors", ".bin")]
        if not weights:
            raise SDFolderError(f"{folder} has no weights file; {LAYOUT_HELP}")
        # fp16-only copies (variant "fp16") are accepted too; everything is loaded as float32 and
        # callers choose the run precision with autocast or .to(dtype).
        kwargs["variant"] = None if any(".fp16." not in n for n in weights) else "fp16"
        kwargs["torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"] = torch.float32
    try:
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - library errors vary; say which part failed
        raise SDFolderError(f"could not load {folder}: {e}; {LAYOUT_HELP}") from e


def load_sd_folder(path) -> Tuple[AutoencoderKL, UNet2DConditionModel, Optional[torch.Tensor]]:
    """Load (vae, unet, null_text) from a local diffusers folder; null_text is None without CLIP."""
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise SDFolderError(f"Stable Diffusion folder {root} does not exist; {LAYOUT_HELP}")
    vae = _load(AutoencoderKL, root / "vae")
    unet = _load(UNet2DConditionModel, root / "unet")
    null_text = None
    if (root / "text_encoder").is_dir() and (root / "tokenizer").is_dir():
        from transformers import CLIPTextModel, CLIPTokenizer

        text_encoder = _load(CLIPTextModel, root / "text_encoder")
        tokenizer = _load(CLIPTokenizer, root / "tokenizer")
        null_text = null_text_embedding(text_encoder.eval(), tokenizer)
        del text_encoder  # only the empty-prompt embedding is ever needed
    else:
        log.warning("%s has no text_encoder/ + tokenizer/: conditioning the UNet on zeros "
                    "instead of the empty-prompt CLIP embedding", root)
    return vae, unet, null_text


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
        self.timestep = cfg.timestep
        # The decoder is never used (we only encode): dropping it saves ~50 M params in v1.5.
        vae.decoder = None
        vae.post_quant_conv = None
        self.vae, self.unet = vae, unet
        cross_dim = unet.config.cross_attention_dim
        if null_text is None:
            log.info("SD conditioning: zeros 1 x %d x %d (no CLIP text encoder given)",
                     CLIP_CONTEXT_LENGTH, cross_dim)
            null_text = torch.zeros(1, CLIP_CONTEXT_LENGTH, cross_dim)
        if null_text.dim() != 3 or null_text.shape[0] != 1 or null_text.shape[-1] != cross_dim:
            raise ValueError(f"null_text must be 1 x L x {cross_dim} (UNet cross_attention_dim), "
                             f"got {tuple(null_text.shape)}")
        self.register_buffer("null_text", null_text.to(next(unet.parameters()).device))

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
    def from_config(cls, cfg: SDConfig, device=None) -> "DiffusionFeatureExtractor":
        """Load `cfg.pretrained_path` (local diffusers folder) or build `cfg.arch` with random
        weights. device="meta" builds the architecture without allocating (sizing, shapes)."""
        if cfg.pretrained_path:
            if device is not None and torch.device(device).type == "meta":
                raise ValueError("a pretrained SD folder cannot be loaded on the meta device")
            vae, unet, null_text = load_sd_folder(cfg.pretrained_path)
            return cls(cfg, vae, unet, null_text).to(device or "cpu")
        vae, unet = build_sd_modules(cfg.arch, device)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls(cfg, vae, unet)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # frozen SD stays in eval mode
            self.vae.eval()
            self.unet.eval()
        return self

    def encode_latent(self, image: torch.Tensor) -> torch.Tensor:
        """VAE latent of an image in [0, 1]: posterior mean x scaling_factor (B x 4 x H/8 x W/8)."""
        x = image.to(self.vae.dtype) * 2.0 - 1.0
        mean = self.vae.encode(x).latent_dist.mean  # the mean, not a sample: deterministic
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (mean - shift) * self.vae.config.scaling_factor

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
                cond = self.null_text.to(self.unet.dtype).expand(b, -1, -1)
                self.unet(latent, self.timestep, encoder_hidden_states=cond, return_dict=False)
            dtype = self.fusion.combine.weight.dtype
            feats = {s: tuple([self._captured[n].to(dtype) for n in names] for names in pair)
                     for s, pair in self._stage_names.items()}
            tokens = self._captured["tokens"]
        finally:
            self._captured.clear()

        features = self.fusion(feats, tuple(latent.shape[-2:]))  # B x C x hp/8 x wp/8
        f = self.latent_factor
        features = features[..., :math.ceil(h / f), :math.ceil(w / f)]
        s = self.token_stride
        tokens = tokens[..., :math.ceil(h / s), :math.ceil(w / s)]
        return {"features": features, "tokens": tokens.flatten(2).transpose(1, 2)}
