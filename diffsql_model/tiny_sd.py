"""Tiny Stable Diffusion (VAE + UNet + CLIP text encoder) for tests and CPU runs.

Same structure as SD v1.5 so every hook point of `sd_features` exists: the VAE has 4 encoder
blocks (8x downsampling, like SD; fewer blocks would make the UNet attention run on a 4x larger
latent and cost seconds on CPU), the UNet has 3 cross-attention down blocks + 1 plain down block,
a cross-attention mid block, 1 plain up block + 3 cross-attention up blocks. Only the widths are
small. The block widths differ per level (16, 24, 32, 40) so tests can tell the levels apart.
"""
from __future__ import annotations

import pathlib
from typing import Union

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

TINY_CROSS_ATTENTION_DIM = 32
TINY_TEXT_MAX_LENGTH = 77  # SD's CLIP context length, kept so the null-text shape matches v1.5

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.18215,
)

TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(16, 24, 32, 40),
    layers_per_block=1,
    cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
    attention_head_dim=2,
    norm_num_groups=8,
)


def build_tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE_CONFIG).eval()


def build_tiny_unet(seed: int = 1) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def build_tiny_text_encoder(seed: int = 2):
    """A 1-layer CLIP text encoder and a character-level CLIP tokenizer, built offline.

    The tokenizer's vocabulary is the byte-level alphabet (each byte alone and as a word end)
    plus CLIP's special tokens, with no merges: enough to tokenize any prompt, including the
    empty prompt SD uses for null-text conditioning. Returns (text_encoder, tokenizer).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = sorted(set(bytes_to_unicode().values()))
    words = alphabet + [c + "</w>" for c in alphabet]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(words + specials)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_TEXT_MAX_LENGTH)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TINY_CROSS_ATTENTION_DIM,
        intermediate_size=2 * TINY_CROSS_ATTENTION_DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TINY_TEXT_MAX_LENGTH,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return CLIPTextModel(config).eval(), tokenizer


def build_tiny_sd_folder(path: Union[str, pathlib.Path], with_text_encoder: bool = True,
                         seed: int = 0) -> dict:
    """Write a tiny SD model as a diffusers folder: path/vae, path/unet (+ text_encoder, tokenizer).

    This is the layout `DiffusionFeatureExtractor.from_config` loads from a local SD v1.5
    folder. Returns the in-memory modules {"vae", "unet", "text_encoder", "tokenizer"}
    (the last two None when with_text_encoder is False) so tests can compare.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    modules: dict = {
        "vae": build_tiny_vae(seed),
        "unet": build_tiny_unet(seed + 1),
        "text_encoder": None,
        "tokenizer": None,
    }
    if with_text_encoder:
        modules["text_encoder"], modules["tokenizer"] = build_tiny_text_encoder(seed + 2)
    for name, module in modules.items():
        if module is not None:
            module.save_pretrained(path / name)
    return modules

