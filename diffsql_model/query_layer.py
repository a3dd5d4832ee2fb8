"""Dynamic Self-Query Layer (paper section 3.2, Eqs. 1-11).

Shapes: S is B x E x h x w (decoder output, E = model_dim, h x w = H/2 x W/2); coarse tokens
H are B x L x C; K queries, D depth bins.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def bin_centers_from_widths(b: torch.Tensor, min_depth: float, max_depth: float) -> torch.Tensor:
    """Eq. 11: c(b_i) = d_min + (d_max - d_min) (b_i / 2 + sum_{j<i} b_j); b is B x D, sums to 1."""
    before = torch.cumsum(b, dim=1) - b
    return min_depth + (max_depth - min_depth) * (b / 2 + before)


def expected_depth_and_std(p: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10 (depth = sum_i c_i p_i) and the std of the bin distribution; p is B x D x h x w."""
    c = centers[:, :, None, None]
    depth = (p * c).sum(dim=1, keepdim=True)
    var = (p * (c - depth) ** 2).sum(dim=1, keepdim=True)
    return depth, var.clamp_min(0).sqrt()


class DynamicSelfQueryLayer(nn.Module):
    """S (+ coarse tokens H) -> per-pixel bin probabilities p, bin_centers, depth, uncertainty.

    query_mode: "dynamic" (Eqs. 1-3), "fixed" (Q_base only), "none" (plain 1x1-conv depth head
    over fixed uniform bins, no queries).
    token_channels: C of external tokens (SD); 0 = patch-embed S (kernel = stride = patch_size).
    """

    def __init__(self, model_dim: int, num_queries: int, num_bins: int, min_depth: float,
                 max_depth: float, query_mode: str = "dynamic", token_channels: int = 0,
                 patch_size: int = 16, mlp_hidden: int = 256):
        super().__init__()
        self.query_mode = query_mode
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.num_bins = num_bins
        if query_mode == "none":
            # LayerNorm on S as in the DSQL path below: measured on a monocular run, the decoder's
            # unnormalised S grew to |S| ~ 100, the 1x1 logits spread over ~2000 and the softmax
            # turned one-hot on every pixel (a constant depth with zero gradient from step 250).
            self.norm_s = nn.LayerNorm(model_dim)
            self.depth_head = nn.Conv2d(model_dim, num_bins, 1)
            return
        self.token_channels = token_channels
        if token_channels == 0:
            c = model_dim
            self.patch_embed = nn.Conv2d(model_dim, c, kernel_size=patch_size, stride=patch_size)
        else:
            c = token_channels
        self.q_base = nn.Parameter(torch.randn(num_queries, c) * 0.02)  # Q_base, K x C
        if query_mode == "dynamic":
            self.f_adjust = nn.Linear(c, c)  # Eq. 2: a 1x1 conv on a B x C vector is a linear map
        self.query_proj = nn.Linear(c, model_dim)  # Q_output (C) -> query space of S (E)
        # LayerNorm on both sides of Eq. 7 (not in the paper): V starts O(1) per pixel and stays
        # bounded; without it V ~ 0.02 at init and the bilinear Q.S grows slowly, then explodes
        # and the plane softmax (Eq. 9) saturates into a constant depth at min or max.
        self.norm_q = nn.LayerNorm(model_dim)
        self.norm_s = nn.LayerNorm(model_dim)
        self.bins_mlp = nn.Sequential(nn.Linear(model_dim, mlp_hidden), nn.LeakyReLU(),
                                      nn.Linear(mlp_hidden, num_bins))
        self.to_planes = nn.Conv2d(num_queries, num_bins, 1)  # Eq. 9: V (K planes) -> D planes

    def coarse_tokens(self, S: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        if self.token_channels == 0:
            return self.patch_embed(S).flatten(2).transpose(1, 2)  # B x L x E
        if tokens is None or tokens.shape[-1] != self.token_channels:
            got = None if tokens is None else tuple(tokens.shape)
            raise ValueError(f"query layer expects tokens B x L x {self.token_channels}, got {got}")
        return tokens

    def dynamic_queries(self, H: torch.Tensor) -> torch.Tensor:
        """Eqs. 1-3: Q_dynamic = Q_base + f_adjust(mean_L H); B x K x C."""
        q = self.q_base.unsqueeze(0).expand(H.shape[0], -1, -1)
        if self.query_mode == "dynamic":
            g = H.mean(dim=1)  # Eq. 1, B x C
            q = q + self.f_adjust(g).unsqueeze(1)  # Eqs. 2-3
        return q

    def forward(self, S: torch.Tensor, tokens: torch.Tensor | None = None) -> dict:
        B = S.shape[0]
        if self.query_mode == "none":
            S = self.norm_s(S.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # per-pixel norm over E
            p = F.softmax(self.depth_head(S), dim=1)
            b = S.new_full((B, self.num_bins), 1.0 / self.num_bins)
            centers = bin_centers_from_widths(b, self.min_depth, self.max_depth)
            depth, std = expected_depth_and_std(p, centers)
            return {"depth": depth, "uncertainty": std, "bin_centers": centers, "bin_widths": b,
                    "probabilities": p}
        H = self.coarse_tokens(S, tokens)
        q_dyn = self.dynamic_queries(H)
        # Eqs. 4-5, scaled by 1/sqrt(C): SD tokens have C up to 1280 and unscaled dot products
        # saturate the softmax into one-hot attention with vanishing gradients.
        A = torch.einsum("bkc,blc->bkl", q_dyn, H) / math.sqrt(H.shape[-1])
        A = F.softmax(A, dim=-1)
        q_out = torch.einsum("bkl,blc->bkc", A, H)  # Eq. 6
        Q = self.norm_q(self.query_proj(q_out))  # B x K x E
        S = self.norm_s(S.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # per-pixel norm over E
        # Eq. 7 names Q_dynamic, which lives in token space (C); S has E channels, so the attended
        # Q_output of Eq. 6, projected to E, is what meets S here.
        # Eq. 7, self_cost_volume, scaled by 1/sqrt(E) like Eq. 4: unscaled |V| grows into the
        # thousands during training and both softmaxes (Eqs. 8-9) turn one-hot, freezing depth.
        V = torch.einsum("bke,behw->bkhw", Q, S) / math.sqrt(S.shape[1])
        # Eq. 8: per query, pixels pooled by softmax(V_i) over all h*w pixels; summed over queries.
        attn = F.softmax(V.flatten(2), dim=-1)  # B x K x hw
        pooled = torch.einsum("bkn,ben->be", attn, S.flatten(2))  # B x E
        b = F.softplus(self.bins_mlp(pooled)) + 1e-3  # positive; the floor keeps every bin alive
        b = b / b.sum(dim=1, keepdim=True)
        centers = bin_centers_from_widths(b, self.min_depth, self.max_depth)  # Eq. 11
        p = F.softmax(self.to_planes(V), dim=1)  # Eq. 9, plane-wise softmax, B x D x h x w
        depth, std = expected_depth_and_std(p, centers)  # Eq. 10
        return {"depth": depth, "uncertainty": std, "bin_centers": centers, "bin_widths": b,
                "probabilities": p, "dynamic_queries": q_dyn, "self_cost_volume": V}
