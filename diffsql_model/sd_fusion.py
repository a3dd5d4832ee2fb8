"""Diffusion-augmented feature fusion (paper section 3.1, Fig. 3).

Per UNet stage (encoder = down blocks, latent = mid block, decoder = up blocks) the ResNet
outputs (local features) and the attention outputs (global features) are brought to one channel
width by 1x1 convolutions, concatenated, and reduced by a second 1x1 convolution. The three stage
maps are then joined by skip connections (encoder and latent bypass the decoder and are
concatenated with it, as in a U-Net) and reduced to the diffusion-augmented feature map.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

STAGES = ("encoder", "latent", "decoder")


class ChannelUnify(nn.Module):
    """1x1 conv over the channel-concatenation of maps of different resolutions, resized to `size`.

    A 1x1 conv of a concatenation is the sum of 1x1 convs of its parts, and a 1x1 conv commutes
    with bilinear resizing (weights sum to 1), so each part is convolved at its own (coarse)
    resolution and then upsampled: same result as resize-concat-conv, without materialising
    thousands of channels at H/8 x W/8.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        if not in_channels:
            raise ValueError("ChannelUnify needs at least one input")
        self.convs = nn.ModuleList(
            nn.Conv2d(c, out_channels, 1, bias=(i == 0)) for i, c in enumerate(in_channels)
        )

    def forward(self, maps: Sequence[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        out = None
        for conv, x in zip(self.convs, maps):
            y = conv(x)
            if tuple(y.shape[-2:]) != tuple(size):
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        return out


class StageFusion(nn.Module):
    """One stage of Fig. 3: unify local and global channels, concatenate, reduce."""

    def __init__(self, local_channels: Sequence[int], global_channels: Sequence[int],
                 channels: int):
        super().__init__()
        self.unify_local = ChannelUnify(local_channels, channels)
        self.unify_global = ChannelUnify(global_channels, channels)
        self.reduce = nn.Conv2d(2 * channels, channels, 1)
        # Without a nonlinearity the whole fusion would collapse into one linear map.
        self.act = nn.GELU()

    def forward(self, local: Sequence[torch.Tensor], global_: Sequence[torch.Tensor],
                size: Tuple[int, int]) -> torch.Tensor:
        local_f = self.act(self.unify_local(local, size))
        global_f = self.act(self.unify_global(global_, size))
        return self.act(self.reduce(torch.cat([local_f, global_f], dim=1)))


class DiffusionFeatureFusion(nn.Module):
    """Fuses the hooked SD features into a `channels` x H/8 x W/8 map.

    stage_channels: {stage: (local channel list, global channel list)} for encoder/latent/decoder.
    """

    def __init__(self, stage_channels: Dict[str, Tuple[List[int], List[int]]], channels: int):
        super().__init__()
        missing = [s for s in STAGES if s not in stage_channels]
        if missing:
            raise ValueError(f"missing SD stages {missing}")
        self.stages = nn.ModuleDict(
            {s: StageFusion(*stage_channels[s], channels) for s in STAGES}
        )
        # Skip connections: encoder + latent + decoder stage maps concatenated, then reduced.
        self.combine = nn.Conv2d(len(STAGES) * channels, channels, 1)
        self.out_channels = channels

    def forward(self, features: Dict[str, Tuple[List[torch.Tensor], List[torch.Tensor]]],
                size: Tuple[int, int]) -> torch.Tensor:
        stage_maps = [self.stages[s](*features[s], size) for s in STAGES]  # 3 x (B, C, h, w)
        return self.combine(torch.cat(stage_maps, dim=1))
