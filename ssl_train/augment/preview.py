"""The augmentation preview: a PNG of a few images next to the views a run would train on."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from ssl_train.augment.batched import build_augmenter
from ssl_train.augment.recipes import MEAN, STD, check_images
from ssl_train.config import TrainConfig

PREVIEW_CELL = 128  # preview tiles are upscaled (nearest) to at least this many pixels a side


def _display(images: torch.Tensor, cell: int) -> torch.Tensor:
    """[0, 1] images ``[N, 3, h, w]`` resized (nearest) to ``[N, 3, cell, cell]`` for the preview."""
    return F.interpolate(images, size=(cell, cell), mode="nearest-exact")


def save_preview(
    config: TrainConfig, images: torch.Tensor, path: str | Path, num_images: int = 8, seed: int = 0
) -> Path:
    """Write a PNG grid: one row per image, the original then each of its views (``augment.backend``'s).

    Views are de-normalised for display and every tile is upscaled (nearest) to
    ``S * ceil(PREVIEW_CELL / S)`` pixels a side, so 32-pixel digits stay visible.
    The draw is repeatable for a given ``seed`` and leaves the global RNG untouched.
    """
    check_images(images, "save_preview")
    if num_images < 1 or len(images) == 0:
        raise ValueError(f"save_preview: need num_images >= 1 and some images, got {num_images} and {len(images)}")
    images = images[:num_images]
    side = images.shape[-1]
    cell = side * math.ceil(PREVIEW_CELL / side)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        views = build_augmenter(config)(images)
    columns = [_display(images.float() / 255.0, cell)] + [_display((v * std + mean).clamp(0, 1), cell) for v in views]
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # row by row: the image, then its views
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0), path)
    return path
