"""U-Net decoder: encoder levels (+ SD features at the fourth down-sampling stage) -> S at H/2."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Decoder widths at 1/2, 1/4, 1/8, 1/16, 1/32 (Monodepth2's widths; S gets model_dim at the end).
DECODER_CHANNELS = (16, 32, 64, 128, 256)


class ConvBlock(nn.Module):
    """3x3 conv (reflection padding, avoids border artefacts in depth) + ELU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")
        self.act = nn.ELU(inplace=True)

    def forward(self, x):
        return self.act(self.conv(x))


class UNetDecoder(nn.Module):
    """Upsamples from 1/32 to 1/2 with skip connections.

    `sd_channels` > 0: SD features (B x sd_channels x H/8 x W/8) are resized to 1/16 and
    concatenated with the encoder's 1/16 level (paper section 3.1, Fig. 2 red box).
    """

    def __init__(self, num_ch_enc: list[int], model_dim: int, sd_channels: int = 0):
        super().__init__()
        self.sd_channels = sd_channels
        skip_ch = list(num_ch_enc)
        skip_ch[3] += sd_channels
        self.up_convs = nn.ModuleList()  # conv before 2x upsampling, per level 4..0
        self.fuse_convs = nn.ModuleList()  # conv after concatenating the skip
        cin = num_ch_enc[4]
        for level in range(4, -1, -1):
            cout = DECODER_CHANNELS[level]
            self.up_convs.append(ConvBlock(cin, cout))
            # after upsampling, level l meets the skip of level l-1; level 0 (1/2) refines only
            skip = skip_ch[level - 1] if level > 0 else 0
            self.fuse_convs.append(ConvBlock(cout + skip, cout))
            cin = cout
        self.out_conv = nn.Conv2d(DECODER_CHANNELS[0], model_dim, 3, padding=1, padding_mode="reflect")

    def forward(self, feats: list[torch.Tensor], sd_features: torch.Tensor | None = None) -> torch.Tensor:
        skips = list(feats)
        if self.sd_channels:
            if sd_features is None:
                raise ValueError("decoder built for SD features but none were given")
            sd = F.interpolate(sd_features, size=skips[3].shape[-2:], mode="bilinear", align_corners=False)
            skips[3] = torch.cat([skips[3], sd], dim=1)
        x = skips[4]
        for i, level in enumerate(range(4, -1, -1)):
            x = self.up_convs[i](x)
            if level > 0:
                x = F.interpolate(x, size=skips[level - 1].shape[-2:], mode="nearest")
                x = torch.cat([x, skips[level - 1]], dim=1)
            x = self.fuse_convs[i](x)
        return self.out_conv(x)  # B x model_dim x H/2 x W/2
