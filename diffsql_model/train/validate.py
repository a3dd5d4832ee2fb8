"""Validation during training (AbsRel etc. on frames with ground-truth depth) and TensorBoard
image grids (input, depth, uncertainty)."""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..eval.metrics import evaluate_frame, garg_crop_mask, mean_metrics, resize_prediction


@torch.no_grad()
def validate(model: torch.nn.Module, dataset, device: torch.device, *, max_frames: int = 200,
             crop: str = "garg", min_depth: float = 1e-3, max_depth: float = 80.0,
             scaling: str = "median") -> dict:
    """Mean metrics over up to `max_frames` samples of `dataset` that carry "depth_gt".

    The prediction is resized (bilinear) to the ground-truth size, compared on valid pixels
    (min_depth < gt < max_depth, inside the Garg crop unless crop="none"), median-scaled per
    image (scaling="median") or taken as metric (scaling="none"). Adds "scale_median", the
    median of the per-image ratios (about 1 for a metric MS model), and "frames"."""
    was_training = model.training
    model.eval()
    per_frame, ratios = [], []
    try:
        n = min(len(dataset), max_frames) if max_frames > 0 else len(dataset)
        for i in range(n):
            sample = dataset[i]
            if "depth_gt" not in sample:
                raise ValueError("validation sample has no 'depth_gt' (validation needs ground truth)")
            gt = sample["depth_gt"].squeeze().cpu().numpy().astype(np.float32)
            image = sample[("color", 0)].unsqueeze(0).to(device)
            pred = model(image)["depth"][0, 0].float().cpu().numpy()
            pred = resize_prediction(pred, *gt.shape)
            valid = (gt > min_depth) & (gt < max_depth)
            if crop == "garg":
                valid &= garg_crop_mask(*gt.shape)
            if valid.sum() < 10:
                continue
            metrics, ratio = evaluate_frame(gt, pred, valid, scaling=scaling, scale=1.0,
                                            clip=(min_depth, max_depth))
            per_frame.append(metrics)
            ratios.append(ratio)
    finally:
        model.train(was_training)
    if not per_frame:
        raise ValueError("no validation frame had enough valid ground-truth pixels")
    result = mean_metrics(per_frame)
    result["scale_median"] = float(np.median(ratios))
    result["frames"] = len(per_frame)
    return result


def _colorize(maps: torch.Tensor, colormap: int) -> torch.Tensor:
    """B x 1 x H x W -> B x 3 x H x W in [0, 1], each map normalised to its 1-99 % range."""
    out = []
    for m in maps.detach().float().cpu():
        a = m[0].numpy()
        lo, hi = np.percentile(a, 1), np.percentile(a, 99)
        a8 = (np.clip((a - lo) / max(hi - lo, 1e-8), 0, 1) * 255).astype(np.uint8)
        rgb = cv2.cvtColor(cv2.applyColorMap(a8, colormap), cv2.COLOR_BGR2RGB)
        out.append(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def image_grid(image: torch.Tensor, depth: torch.Tensor, uncertainty: torch.Tensor,
               max_images: int = 4) -> torch.Tensor:
    """3 x H' x W' grid: rows of (input, inverse depth in magma, uncertainty in viridis)."""
    import torchvision

    n = min(max_images, image.shape[0])
    img = image[:n].detach().float().cpu().clamp(0, 1)
    inv = _colorize(1.0 / depth[:n].clamp_min(1e-6), cv2.COLORMAP_MAGMA)
    unc = _colorize(uncertainty[:n], cv2.COLORMAP_VIRIDIS)
    size = img.shape[-2:]
    inv, unc = (F.interpolate(t, size=size, mode="nearest") for t in (inv, unc))
    tiles = torch.stack([img, inv, unc], dim=1).reshape(-1, 3, *size)  # (n*3) x 3 x H x W
    return torchvision.utils.make_grid(tiles, nrow=3, padding=2)
