"""Devices and precisions: the one place that names them and maps them to torch.

`sd_dtypes` says which dtype the frozen Stable Diffusion modules are loaded and kept in for a
run precision, so autocast never re-casts their weights on every forward.
"""
from __future__ import annotations

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is an error, not a fallback."""
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    return torch.device(device)


def check_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def sd_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(VAE dtype, UNet dtype) for a run precision. The SD VAE is `force_upcast` in diffusers:
    its fp16 activations overflow, so an fp16 run keeps the VAE in fp32 (bf16 has fp32's range)."""
    dtype = check_precision(precision)
    return (torch.float32 if dtype == torch.float16 else dtype), dtype
