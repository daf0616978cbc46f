"""Backbones (the encoder f): images ``[B, 3, H, W]`` -> features ``[B, feature_dim]``."""

from __future__ import annotations

import typing

from torch import nn
from torchvision.models import resnet18, resnet50

from ssl_train.config import BackboneConfig


class SmallCNN(nn.Sequential):
    """Four conv3x3-BN-ReLU blocks (widths w, 2w, 4w, 8w; the last three stride 2), global average pool.

    Total stride 8: an 8x8 input leaves a 1x1 map. Built for quick CPU demos on 32x32 images.
    """

    def __init__(self, width: int = 32) -> None:
        layers: list[nn.Module] = []
        channels = 3
        for i, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            layers += [
                nn.Conv2d(channels, out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = channels


def _resnet(name: str, small_image_stem: bool) -> nn.Module:
    """torchvision's ResNet (random init) with ``fc`` removed; key names stay torchvision's.

    ``small_image_stem``: the CIFAR variant (SimCLR, solo-learn): conv1 3x3 stride 1, no max-pool,
    so the total stride drops from 32 to 8.
    """
    model = {"resnet18": resnet18, "resnet50": resnet50}[name](weights=None)
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if small_image_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits
        model.maxpool = nn.Identity()
    return model


def build_backbone(config: BackboneConfig) -> nn.Module:
    """The backbone named by ``config.name``; the module carries ``feature_dim: int``."""
    if config.name == "small_cnn":
        return SmallCNN(config.width)
    if config.name in ("resnet18", "resnet50"):
        return _resnet(config.name, config.small_image_stem)
    known = typing.get_args(typing.get_type_hints(BackboneConfig)["name"])  # the config's Literal, in one place
    raise ValueError(f"backbone.name={config.name!r} is unknown; choose one of {list(known)}")
