"""Augmentations: the views an SSL method compares, with one ``strength`` knob."""

from __future__ import annotations

import torch

# ImageNet statistics, as torchvision's pretrained models and the papers' code use.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``[N, 3, H, W]`` -> float32, scaled to [0, 1] and standardised per channel."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std
