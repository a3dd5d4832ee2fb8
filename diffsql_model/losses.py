"""Self-supervised losses (paper section 3.3, PROTOCOLS.md "Training"), Monodepth2 style.

photometric error (Eq. 12), per-pixel minimum over source frames, auto-mask (Eq. 14),
edge-aware smoothness on mean-normalised inverse depth (Eq. 13), total loss (Eq. 15).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import kornia
import torch
import torch.nn.functional as F

from .geometry import backproject, warp_points
from .yaml_config import ConfigError, YamlConfig

C1 = 0.01 ** 2
C2 = 0.03 ** 2


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM map (B x C x H x W, 1 = identical) over a 3x3 box window.

    Written here, not kornia.metrics.ssim: the published numbers use a 3x3 box window with
    reflection padding, kornia uses a Gaussian window and different border handling.
    """
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    y = F.pad(y, (1, 1, 1, 1), mode="reflect")
    mu_x = F.avg_pool2d(x, 3, 1)
    mu_y = F.avg_pool2d(y, 3, 1)
    sigma_x = F.avg_pool2d(x * x, 3, 1) - mu_x ** 2
    sigma_y = F.avg_pool2d(y * y, 3, 1) - mu_y ** 2
    sigma_xy = F.avg_pool2d(x * y, 3, 1) - mu_x * mu_y
    num = (2 * mu_x * mu_y + C1) * (2 * sigma_xy + C2)
    den = (mu_x ** 2 + mu_y ** 2 + C1) * (sigma_x + sigma_y + C2)
    return num / den


def photometric_error(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.85) -> torch.Tensor:
    """Eq. 12: alpha (1 - SSIM) / 2 + (1 - alpha) |pred - target|, channel mean -> B x 1 x H x W."""
    l1 = (pred - target).abs().mean(1, keepdim=True)
    dssim = ((1 - ssim(pred, target)) / 2).clamp(0, 1).mean(1, keepdim=True)
    return alpha * dssim + (1 - alpha) * l1


def min_reprojection(errors: torch.Tensor) -> torch.Tensor:
    """B x S x H x W errors of S source frames -> per-pixel minimum B x 1 x H x W."""
    return errors.min(dim=1, keepdim=True).values


def automask(reprojection_errors: torch.Tensor, identity_errors: torch.Tensor,
             noise: bool = True) -> torch.Tensor:
    """Eq. 14: mu = [min_s pe(I_t, I_s->t) < min_s pe(I_t, I_s)], B x 1 x H x W float.

    With `noise` (Monodepth2's tie-break), tiny N(0, 1e-5) noise is added to the identity error
    so exact ties fall either way at random instead of always being masked out; without it the
    strict `<` masks every tie (identical images select nothing), deterministically.
    """
    identity = min_reprojection(identity_errors)
    if noise:
        identity = identity + torch.randn_like(identity) * 1e-5
    return (min_reprojection(reprojection_errors) < identity).to(reprojection_errors.dtype)


def smoothness_loss(disp: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Eq. 13 on mean-normalised inverse depth d* = d / mean(d) (scale-invariant), scalar:
    mean|dx d*| exp(-mean_c|dx I|) + mean|dy d*| exp(-mean_c|dy I|), kornia's edge-aware loss."""
    d = disp / (disp.mean(dim=(2, 3), keepdim=True) + 1e-7)
    return kornia.losses.inverse_depth_smoothness_loss(d, img)


def normalize_depth(depth: torch.Tensor) -> torch.Tensor:
    """Depth divided by its per-image mean (B x 1 x H x W, mean 1), for monocular training.

    Not in the paper; depth normalisation as in Wang et al., CVPR 2018 ("Learning Depth from
    Monocular Videos using Direct Methods"). M training cannot observe scale, and the bounded
    bins of Eq. 11 (0.1..80 m) start near 40 m, where PoseNet's small initial translations give
    almost identity warps: measured on synthetic drives, the global depth then drifts to an end
    of the range, the plane softmax saturates and depth stays constant. With the mean removed
    the photometric term cannot move the global scale, and the initial PoseNet translations
    (~0.01) are of the order t / depth needs.
    """
    return depth / depth.mean(dim=(2, 3), keepdim=True).clamp_min(1e-6)


@dataclasses.dataclass
class LossConfig(YamlConfig):
    """Weights and switches of the self-supervised loss."""

    alpha: float = 0.85  # SSIM weight in Eq. 12
    smoothness: float = 1e-3  # lambda in Eq. 15
    automask: bool = True
    automask_noise: bool = True  # Monodepth2 tie-break noise on the identity error
    min_reprojection: bool = True  # per-pixel min over sources; False: their mean
    scales: list[int] = dataclasses.field(default_factory=lambda: [0])
    # "auto": on when no source is the stereo partner "s" (M training), off otherwise (MS,
    # stereo: the known baseline fixes metric scale); "on" / "off" force it. See normalize_depth.
    depth_normalization: str = "auto"
    # Not in the paper. Depth normalisation leaves the network's depth scale free: it starts near
    # 50 m, where depth / mean cannot exceed 80 / 50 = 1.6 and a street's far field is clipped,
    # then wanders. Weight of (log mean depth - log scale_anchor_depth)^2, acting on that free
    # scale only (M runs; the photometric term cannot see it); 0 = off. Measured on synthetic
    # worlds (bench/mono_learning.py, docs/benchmarks.md): without it M collapsed to constant depth.
    scale_anchor: float = 0.1
    scale_anchor_depth: float = 10.0  # metres: inside the bins' range, not a claim of metric scale
    # Self-teaching of the uncertainty head (model.uncertainty: head, uncertainty.py): a trained
    # checkpoint whose depth is the head's target, and the weight of laplacian_nll in the loss.
    uncertainty_teacher: Optional[str] = None
    uncertainty_weight: float = 1.0

    def __post_init__(self):
        if self.depth_normalization not in ("auto", "on", "off"):
            raise ConfigError(f"loss.depth_normalization must be auto, on or off, "
                              f"got {self.depth_normalization!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"loss.alpha must be in [0, 1], got {self.alpha}")
        if self.smoothness < 0:
            raise ConfigError(f"loss.smoothness must be >= 0, got {self.smoothness}")
        if self.scale_anchor < 0 or self.scale_anchor_depth <= 0:
            raise ConfigError("loss.scale_anchor must be >= 0 and loss.scale_anchor_depth > 0")
        if self.uncertainty_weight <= 0:
            raise ConfigError(f"loss.uncertainty_weight must be > 0, got {self.uncertainty_weight}")
        if not self.scales or any(s < 0 for s in self.scales):
            raise ConfigError(f"loss.scales must be a non-empty list of scales >= 0, got {self.scales}")


def laplacian_nll(log_depth: torch.Tensor, log_target: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood (up to log 2) of log_target under Laplace(log_depth, b):
    |log_target - log_depth| / b + log b, all B x 1 x H x W. Minimised per pixel at b = |residual|."""
    return ((log_target - log_depth).abs() * torch.exp(-log_b) + log_b).mean()


class SelfSupervisedLoss:
    """L = mu * L_photo + lambda * L_s (Eq. 15), averaged over the configured scales.

    `depth` is a B x 1 x H x W tensor (scale 0) or a dict scale -> B x 1 x H/2^s x W/2^s. As in
    Monodepth2, each scale's depth is upsampled to the input size for the photometric term, and
    its smoothness is taken at its own size with weight lambda / 2^s. Sources are a dict id ->
    B x 3 x H x W; `poses[id]` maps target points into that source (the stereo partner "s" is
    just a source with the known stereo T).
    """

    def __init__(self, cfg: LossConfig | None = None, check_depth: bool = True):
        self.cfg = cfg or LossConfig()
        # The depth check reads a device value: a host sync per step on a GPU, where the trainer
        # instead checks the loss's finiteness on the device every few steps.
        self.check_depth = check_depth

    def __call__(self, target: torch.Tensor, sources: dict, depth: Union[torch.Tensor, dict],
                 K: torch.Tensor, inv_K: torch.Tensor, poses: dict) -> dict:
        cfg = self.cfg
        depths = depth if isinstance(depth, dict) else {0: depth}
        missing = [s for s in cfg.scales if s not in depths]
        if missing:
            raise ValueError(f"depth for scale(s) {missing} not given (have {sorted(depths)})")
        if set(sources) != set(poses):
            raise ValueError(f"sources {sorted(map(str, sources))} and poses "
                             f"{sorted(map(str, poses))} must have the same ids")
        if not sources:
            raise ValueError("at least one source frame is needed")
        h, w = target.shape[-2:]
        ids = list(sources)
        normalize = cfg.depth_normalization == "on" or (
            cfg.depth_normalization == "auto" and "s" not in sources)
        identity = None  # B x 1: per-pixel min over sources of the unwarped error (same at every scale)
        if cfg.automask:
            identity = min_reprojection(
                torch.cat([photometric_error(sources[i], target, cfg.alpha) for i in ids], 1))
        inv_K = torch.linalg.inv(K) if inv_K is None else inv_K

        total, photo_sum, smooth_sum, mask_frac = 0.0, 0.0, 0.0, 0.0
        warped_out: dict = {}
        mask_out = None  # B x 1 x H x W auto-mask of the first scale (1 = the warp won)
        for s in cfg.scales:
            d = depths[s]
            if self.check_depth and (not torch.isfinite(d).all() or (d <= 0).any()):
                raise ValueError(f"depth at scale {s} has non-finite or non-positive values")
            d_full = d if d.shape[-2:] == (h, w) else F.interpolate(
                d, (h, w), mode="bilinear", align_corners=False)
            if normalize:
                d_full = normalize_depth(d_full)
            points = backproject(d_full, inv_K)  # once per scale, shared by every source
            warped = {i: warp_points(sources[i], points, K, poses[i])[0] for i in ids}
            reproj = torch.cat([photometric_error(warped[i], target, cfg.alpha) for i in ids], 1)
            rep_min = min_reprojection(reproj)
            per_pixel = rep_min if cfg.min_reprojection else reproj.mean(1, keepdim=True)
            if cfg.automask:
                mu = automask(rep_min, identity, noise=cfg.automask_noise)
                photo = (mu * per_pixel).mean()
                mask_frac = mask_frac + mu.mean().detach()
                if s == cfg.scales[0]:
                    mask_out = mu.detach()
            else:
                photo = per_pixel.mean()
            img_s = target if d.shape[-2:] == (h, w) else F.interpolate(
                target, d.shape[-2:], mode="area")
            smooth = smoothness_loss(1.0 / d, img_s)
            total = total + photo + cfg.smoothness * smooth / (2 ** s)
            photo_sum = photo_sum + photo.detach()
            smooth_sum = smooth_sum + smooth.detach()
            if s == cfg.scales[0]:
                warped_out = {i: v.detach() for i, v in warped.items()}
        n = len(cfg.scales)
        anchor = torch.zeros((), device=target.device)
        if normalize and cfg.scale_anchor > 0:
            log_mean = depths[cfg.scales[0]].mean(dim=(1, 2, 3)).log()  # B
            anchor = cfg.scale_anchor * (log_mean - math.log(cfg.scale_anchor_depth)).square().mean()
        return {
            "loss": total / n + anchor,
            "scale_anchor": anchor.detach(),
            "photometric": photo_sum / n,
            "smoothness": smooth_sum / n,
            "automask_fraction": (mask_frac / n) if cfg.automask else torch.tensor(1.0),
            # The network's own scale (before any normalisation): free in M training, so watched.
            "mean_depth": depths[cfg.scales[0]].detach().mean(),
            "warped": warped_out,
            "automask": mask_out,
        }
