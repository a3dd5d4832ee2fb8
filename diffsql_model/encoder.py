"""ResNet encoder of the DepthNet: five feature levels at 1/2 .. 1/32 of the input."""
from __future__ import annotations

import os
import pathlib

import torch
import torch.nn as nn
import torchvision

from .errors import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ARCHS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
}


def imagenet_weights_path(backbone: str) -> pathlib.Path:
    """Where torchvision's hub cache keeps the ImageNet weights of `backbone`."""
    url = _ARCHS[backbone][1].url
    return pathlib.Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _load_weights(net: nn.Module, backbone: str, weights: str) -> None:
    if weights == "none":
        return
    if weights == "imagenet":
        path = imagenet_weights_path(backbone)
        if not path.is_file():
            url = _ARCHS[backbone][1].url
            raise FileNotFoundError(
                f"ImageNet weights for {backbone} not found at {path} (this code never downloads). "
                f"Copy them there from a machine with internet (e.g. `curl -L -o {path.name} {url}`, "
                f"or run torchvision.models.{backbone}(weights='IMAGENET1K_V1') there and copy "
                f"$TORCH_HOME/hub/checkpoints/{path.name}); set TORCH_HOME to choose the cache folder, "
                f"or use weights='none' or a path to a .pth state dict."
            )
    else:
        path = pathlib.Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{backbone} weights file not found: {path} "
                                    f"(weights: 'none', 'imagenet' or a path to a .pth state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"encoder weights {path} are corrupt or not a torch file: {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {backbone}: {str(e).splitlines()[0]}") from None


def build_resnet(backbone: str, weights: str = "none") -> nn.Module:
    """torchvision ResNet with `weights` "none", "imagenet" (the local hub cache only: never
    downloads) or a path to a .pth state dict; the DepthNet encoder and PoseNet both use it."""
    if backbone not in _ARCHS:
        raise ValueError(f"unknown backbone {backbone!r}; known: {sorted(_ARCHS)}")
    net = _ARCHS[backbone][0](weights=None)
    _load_weights(net, backbone, weights)
    return net


class ResNetEncoder(nn.Module):
    """torchvision ResNet without its classifier; returns [1/2, 1/4, 1/8, 1/16, 1/32] features."""

    def __init__(self, backbone: str = "resnet18", weights: str = "none"):
        super().__init__()
        net = build_resnet(backbone, weights)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if backbone == "resnet50" else 1
        self.num_ch_enc = [64] + [c * expansion for c in (64, 128, 256, 512)]
        # Buffers, not parameters: the normalisation is fixed, and moves with .to(device).
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = (image - self.mean) / self.std
        f1 = self.relu(self.bn1(self.conv1(x)))  # 1/2
        f2 = self.layer1(self.maxpool(f1))  # 1/4
        f3 = self.layer2(f2)  # 1/8
        f4 = self.layer3(f3)  # 1/16
        f5 = self.layer4(f4)  # 1/32
        return [f1, f2, f3, f4, f5]
