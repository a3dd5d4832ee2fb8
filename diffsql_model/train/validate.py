"""Validation during training (AbsRel etc. on frames with ground-truth depth) and TensorBoard
image grids (input, depth, uncertainty)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from ..colormaps import colorize_percentiles
from ..eval.metrics import evaluate_frame, garg_crop_mask, mean_metrics, resize_prediction
from ..inference import predict_depth


def validate(model: torch.nn.Module, dataset, device: torch.device, *, max_frames: int = 200,
             crop: str = "garg", min_depth: float = 1e-3, max_depth: float = 80.0,
             scaling: str = "median", batch_size: int = 8) -> dict:
    """Mean metrics over up to `max_frames` samples of `dataset` that carry "depth_gt".

    The model runs on `batch_size` frames at a time (eval mode: the same depth as one by one).
    Each prediction is resized (bilinear) to its ground-truth size, compared on valid pixels
    (min_depth < gt < max_depth, inside the Garg crop unless crop="none"), median-scaled per
    image (scaling="median") or taken as metric (scaling="none"). Adds "scale_median", the
    median of the per-image ratios (about 1 for a metric MS model), and "frames"."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    per_frame, ratios = [], []
    try:
        n = min(len(dataset), max_frames) if max_frames > 0 else len(dataset)
        for start in range(0, n, batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, n))]
            if any("depth_gt" not in sample for sample in samples):
                raise ValueError("validation sample has no 'depth_gt' (validation needs ground truth)")
            images = torch.stack([sample[("color", 0)] for sample in samples])
            preds = predict_depth(model, images, device=device)
            for sample, pred in zip(samples, preds):
                gt = sample["depth_gt"].squeeze().cpu().numpy().astype(np.float32)
                result = _frame_metrics(gt, pred, crop, min_depth, max_depth, scaling)
                if result is not None:
                    per_frame.append(result[0])
                    ratios.append(result[1])
    finally:
        model.train(was_training)
    if not per_frame:
        raise ValueError("no validation frame had enough valid ground-truth pixels")
    result = mean_metrics(per_frame)
    result["scale_median"] = float(np.median(ratios))
    result["frames"] = len(per_frame)
    return result


def _frame_metrics(gt: np.ndarray, pred: np.ndarray, crop: str, min_depth: float, max_depth: float,
                   scaling: str):
    """(metrics, scale ratio) of one frame, None when it has fewer than 10 valid pixels."""
    pred = resize_prediction(pred, *gt.shape)
    valid = (gt > min_depth) & (gt < max_depth)
    if crop == "garg":
        valid &= garg_crop_mask(*gt.shape)
    if valid.sum() < 10:
        return None
    return evaluate_frame(gt, pred, valid, scaling=scaling, scale=1.0, clip=(min_depth, max_depth))


def _colorize(maps: torch.Tensor, name: str) -> torch.Tensor:
    """B x 1 x H x W -> B x 3 x H x W in [0, 1], each map over its 1-99 % range (`colormaps`)."""
    return torch.stack([torch.from_numpy(colorize_percentiles(m[0].numpy(), name)).permute(2, 0, 1).float() / 255
                        for m in maps.detach().float().cpu()])


def image_grid(image: torch.Tensor, depth: torch.Tensor, uncertainty: torch.Tensor,
               max_images: int = 4, automask: torch.Tensor | None = None) -> torch.Tensor:
    """3 x H' x W' grid: rows of (input, inverse depth in magma, uncertainty in viridis) and, with
    `automask` (B x 1 x H x W, 1 = the warp won), a fourth tile: black where the photometric
    minimum picked the unwarped source, i.e. pixels the loss ignored."""
    n = min(max_images, image.shape[0])
    img = image[:n].detach().float().cpu().clamp(0, 1)
    inv = _colorize(1.0 / depth[:n].clamp_min(1e-6), "magma")
    unc = _colorize(uncertainty[:n], "viridis")
    size = img.shape[-2:]
    parts = [img] + [F.interpolate(t, size=size, mode="nearest") for t in (inv, unc)]
    if automask is not None:
        parts.append(F.interpolate(automask[:n].detach().float().cpu(), size=size, mode="nearest").expand(-1, 3, -1, -1))
    tiles = torch.stack(parts, dim=1).reshape(-1, 3, *size)  # (n*tiles) x 3 x H x W
    return torchvision.utils.make_grid(tiles, nrow=len(parts), padding=2)
