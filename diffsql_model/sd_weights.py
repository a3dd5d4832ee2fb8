"""Stable Diffusion weights: the v1.5 architecture, random modules built from a seed, and local
diffusers folders loaded straight onto a device in the run's dtypes. Never downloads."""
from __future__ import annotations

import contextlib
import logging
import pathlib
from typing import Optional, Tuple

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from . import tiny_sd

log = logging.getLogger(__name__)

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


def build_sd_modules(arch: str, device=None, seed: Optional[int] = None,
                     dtypes: Tuple[torch.dtype, torch.dtype] = (torch.float32, torch.float32),
                     ) -> Tuple[AutoencoderKL, UNet2DConditionModel]:
    """Randomly initialised (vae, unet) of `arch` ("v1.5" | "tiny") in `dtypes` (VAE, UNet).

    device="meta" allocates nothing. With `seed` the weights are a function of the seed alone
    (built on the CPU under a forked RNG, then moved): a checkpoint can rebuild frozen random SD
    from the seed instead of storing it."""
    configs = {"v1.5": (SD15_VAE_CONFIG, SD15_UNET_CONFIG),
               "tiny": (tiny_sd.TINY_VAE_CONFIG, tiny_sd.TINY_UNET_CONFIG)}
    if arch not in configs:
        raise ValueError(f"unknown SD arch {arch!r}, expected one of {sorted(configs)}")
    vae_cfg, unet_cfg = configs[arch]
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return AutoencoderKL(**vae_cfg), UNet2DConditionModel(**unet_cfg)
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        vae, unet = AutoencoderKL(**vae_cfg), UNet2DConditionModel(**unet_cfg)
    return place(vae, device, dtypes[0]), place(unet, device, dtypes[1])


def place(module: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """Move a diffusers module to device and dtype. Plain nn.Module.to: diffusers' own `to` warns
    on every dtype cast of models that keep no fp32 modules (neither the SD VAE nor the UNet)."""
    return nn.Module.to(module, device or "cpu", dtype)


def weights_fingerprint(*modules: nn.Module) -> float:
    """Sum of all parameters in float64: tells whether a rebuild from a seed gave the same weights."""
    return float(sum(p.detach().double().sum().item() for m in modules for p in m.parameters()))


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


def _load(cls, folder: pathlib.Path, dtype: torch.dtype = torch.float32, device=None):
    if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise SDFolderError(f"{folder} is missing; {LAYOUT_HELP}")
    kwargs = {}
    if not cls.__name__.endswith("Tokenizer"):
        weights = [f.name for f in folder.iterdir() if f.suffix in (".safetensors", ".bin")]
        if not weights:
            raise SDFolderError(f"{folder} has no weights file; {LAYOUT_HELP}")
        # fp16-only copies (variant "fp16") are accepted too, converted to `dtype` as they load.
        kwargs["variant"] = None if any(".fp16." not in n for n in weights) else "fp16"
        kwargs["torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"] = dtype
        if device is not None and cls.__module__.startswith("diffusers"):
            # Straight onto the device, one tensor at a time: host memory stays near one copy.
            kwargs["device_map"] = str(torch.device(device))
    try:
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - library errors vary; say which part failed
        raise SDFolderError(f"could not load {folder}: {e}; {LAYOUT_HELP}") from e


def load_sd_folder(path, device=None,
                   dtypes: Tuple[torch.dtype, torch.dtype] = (torch.float32, torch.float32),
                   ) -> Tuple[AutoencoderKL, UNet2DConditionModel, Optional[torch.Tensor]]:
    """Load (vae, unet, null_text) from a local diffusers folder onto `device` in `dtypes`
    (VAE, UNet); null_text (float32, CPU) is None without CLIP."""
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise SDFolderError(f"Stable Diffusion folder {root} does not exist; {LAYOUT_HELP}")
    vae = _load(AutoencoderKL, root / "vae", dtypes[0], device)
    unet = _load(UNet2DConditionModel, root / "unet", dtypes[1], device)
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
