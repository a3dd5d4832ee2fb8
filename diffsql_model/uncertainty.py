"""Trained depth uncertainty: a head that predicts where the depth is unreliable.

Not in the paper, which has no uncertainty. The bin distribution's spread (Eq. 10) is never
trained to mean anything and ranks the errors no better than random (docs/benchmarks.md), so a
small head predicts the scale b of a Laplacian on log depth, trained by self-teaching (Poggi et
al., CVPR 2020): the negative log-likelihood of a frozen teacher's log depth (losses.laplacian_nll).
It reads the decoder's features detached, so the depth is trained by Eq. 15 alone and is the same
as without the head; b learns where this model and an independently trained one disagree.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

LOG_B_RANGE = (-8.0, 3.0)  # clamp of log b: b in [3e-4, 20] (relative depth std 0.05 % .. 28x)


class UncertaintyHead(nn.Module):
    """Decoder features S (B x E x h x w) -> log b (B x 1 x h x w), b the Laplacian scale of log depth."""

    def __init__(self, channels: int, init_b: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ELU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ELU(),
            nn.Conv2d(channels, 1, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, math.log(init_b))  # start at 10 % relative everywhere

    def forward(self, S: torch.Tensor) -> torch.Tensor:
        return self.net(S.detach()).clamp(*LOG_B_RANGE)


def depth_std(depth: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Standard deviation in metres of depth whose log is Laplacian with scale b around log depth:
    std(log d) = sqrt(2) b, and std(d) ~ d sqrt(2) b to first order (the published uncertainty)."""
    return depth * (math.sqrt(2.0) * log_b.exp())
