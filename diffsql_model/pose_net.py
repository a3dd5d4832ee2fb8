"""PoseNet for self-supervised training: ResNet encoder on two stacked frames -> 6-DoF motion.

Convention: `forward(img_a, img_b)` predicts the motion whose transform
`transformation_from_parameters(axisangle, translation)` maps camera-a points into camera b
(X_b = T X_a). Frames are always fed in temporal order (earlier first) so the network sees one
direction of motion; `relative_pose(pose_net, target, source, source_id)` then inverts for past
sources, giving the T that docs/interfaces.md needs (target points -> source camera).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from .encoder import build_resnet


def transformation_from_parameters(axisangle: torch.Tensor, translation: torch.Tensor,
                                   invert: bool = False) -> torch.Tensor:
    """axis-angle B x 3 and translation B x 3 (extra singleton dims allowed) -> B x 4 x 4 float32.

    T = [R | t] (X' = R X + t); with `invert`, the exact inverse [R^T | -R^T t]. Always computed in
    fp32, also inside a caller's autocast: bf16 keeps 8 significant bits (`R^T t` was off by
    ~4 mm per metre of translation), and a 4 x 4 pose costs nothing to compose in full precision.
    """
    with torch.autocast(axisangle.device.type, enabled=False):
        aa = axisangle.reshape(-1, 3).float()
        t = translation.reshape(-1, 3).float()
        R = axis_angle_to_rotation_matrix(aa)  # B x 3 x 3
        if invert:
            R = R.transpose(1, 2)
            t = -(R @ t.unsqueeze(-1)).squeeze(-1)
        T = torch.eye(4, dtype=aa.dtype, device=aa.device).repeat(aa.shape[0], 1, 1)
        T[:, :3, :3] = R
        T[:, :3, 3] = t
    return T


def relative_pose(pose_net: nn.Module, target: torch.Tensor, source: torch.Tensor,
                  source_id: int) -> torch.Tensor:
    """B x 4 x 4 T mapping target camera points into the source camera (X_src = T X_tgt).

    `pose_net` is a PoseNet or its DistributedDataParallel wrapper. The earlier frame goes first;
    a past source (source_id < 0) inverts the predicted (source -> target) motion."""
    if source_id < 0:
        axisangle, translation = pose_net(source, target)
        return transformation_from_parameters(axisangle, translation, invert=True)
    axisangle, translation = pose_net(target, source)
    return transformation_from_parameters(axisangle, translation)


# The motion an untrained PoseNet predicts (translation, earlier frame first, in units of the
# mean depth as M training normalises it; X_later = X_earlier + t). "forward": a camera that
# looks where it moves (cars, most robots' front cameras). From zero, PoseNet first learns the
# dataset's average motion while it cannot yet read motion from the images, and on some worlds
# that average locks into a sideways "pivot" motion with a depth ramp that fits it (measured:
# docs/benchmarks.md, "Why M fails on the demo world"). "none": zero, for side or rear cameras.
POSE_PRIORS = {"forward": (0.0, 0.0, -0.05), "none": (0.0, 0.0, 0.0)}


class PoseNet(nn.Module):
    """ResNet (first conv widened to 6 channels) + small conv decoder -> (axisangle, translation)."""

    def __init__(self, num_layers: int = 18, weights: str = "none", scale: float = 0.01,
                 prior: str = "none"):
        super().__init__()
        if num_layers not in (18, 34, 50):
            raise ValueError(f"num_layers must be one of [18, 34, 50], got {num_layers}")
        if prior not in POSE_PRIORS:
            raise ValueError(f"pose prior must be one of {sorted(POSE_PRIORS)}, got {prior!r}")
        # "none", "imagenet" (the local torch hub cache only, as the encoder: never downloads) or a .pth.
        resnet = build_resnet(f"resnet{num_layers}", weights)
        conv1 = nn.Conv2d(6, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if weights == "none":
            # Its own random filters per frame: copies of one random filter would see only the
            # sum of the two frames, blind to the motion between them until training breaks the
            # symmetry (measured: PoseNet then fits a sideways motion to the scene's look).
            nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
        else:
            with torch.no_grad():
                # Pretrained RGB filters shared by both frames, halved so activations keep their scale.
                conv1.weight.copy_(torch.cat([resnet.conv1.weight] * 2, dim=1) / 2)
        resnet.conv1 = conv1
        self.encoder = nn.Sequential(*list(resnet.children())[:-2])  # drop avgpool + fc
        feat = 512 if num_layers < 50 else 2048
        self.decoder = nn.Sequential(
            nn.Conv2d(feat, 256, 1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 6, 1),
        )
        # Small outputs make training start near the identity motion (plus the prior's translation).
        self.scale = scale
        with torch.no_grad():
            self.decoder[-1].bias[3:] += torch.tensor(POSE_PRIORS[prior]) / scale
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406] * 2).view(1, 6, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225] * 2).view(1, 6, 1, 1))

    def forward(self, img_a: torch.Tensor, img_b: torch.Tensor):
        """Two B x 3 x H x W images in [0, 1] -> (axisangle B x 3, translation B x 3)."""
        x = (torch.cat([img_a, img_b], dim=1) - self.mean) / self.std
        out = self.decoder(self.encoder(x)).mean(dim=(2, 3)) * self.scale  # B x 6
        return out[:, :3], out[:, 3:]
