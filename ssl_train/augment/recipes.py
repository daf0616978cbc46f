"""Augmentations: the views an SSL method compares, with one ``strength`` knob.

At ``augment.strength = 1`` with no per-op override every view follows BYOL's recipe
(Grill et al. 2020, Appendix B, Table 6): random resized crop (scale 0.08-1, ratio 3/4-4/3),
horizontal flip p=0.5, colour jitter p=0.8 (brightness 0.4, contrast 0.4, saturation 0.2,
hue 0.1, in random order), grayscale p=0.2, Gaussian blur (sigma 0.1-2.0, kernel about 10% of
the side) p=1.0 / 0.1 and solarisation p=0.0 / 0.2 on view 1 / view 2. ``strength`` s scales
the jitter magnitudes and the jitter, grayscale, blur and solarisation probabilities by s
(clipped to [0, 1], hue to 0.5); crop and flip do not depend on it, so s=0 is crop + flip.
A per-op field set in the config replaces the strength-derived value of that op alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ssl_train.config import TrainConfig, min_image_size

# ImageNet statistics, as torchvision's pretrained models and the papers' code use.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# BYOL's values at strength 1 (Grill et al. 2020, Table 6); pairs are (view 1, view 2).
PAPER_JITTER_P = 0.8
PAPER_BRIGHTNESS = 0.4
PAPER_CONTRAST = 0.4
PAPER_SATURATION = 0.2
PAPER_HUE = 0.1
PAPER_GRAYSCALE_P = 0.2
PAPER_BLUR_P = (1.0, 0.1)
PAPER_SOLARIZE_P = (0.0, 0.2)
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128  # on uint8 pixels, i.e. 0.5 of the [0, 1] range
MAX_HUE = 0.5  # ColorJitter's hue factor lies in [-0.5, 0.5]


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``[N, 3, H, W]`` -> float32, scaled to [0, 1] and standardised per channel."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


@dataclass(frozen=True)
class ViewRecipe:
    """The effective parameters of one view once ``strength`` and the overrides are applied."""

    size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip_p: float
    jitter_p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale_p: float
    blur_p: float
    solarize_p: float


def _scaled(override: float | None, paper: float, strength: float, high: float = 1.0) -> float:
    """The config's value if set, else the paper's value times ``strength`` clipped to [0, high]."""
    return override if override is not None else min(high, paper * strength)


def view_recipes(config: TrainConfig) -> list[ViewRecipe]:
    """The recipe of every view a training step compares, in the order the method expects.

    BYOL: two asymmetric views of side ``data.image_size``, crop scale ``augment.crop_scale``,
    view 1 with blur_p[0] / solarize_p[0], view 2 with blur_p[1] / solarize_p[1].

    SwAV: two global views (side ``data.image_size``, scale ``augment.global_crop_scale``) with
    the same view 1 / view 2 asymmetry, then ``augment.num_local_crops`` local views of side
    ``augment.local_crop_size`` (default ``round(S * 96 / 224)``, SwAV's 96-of-224 ratio, at least
    the backbone's minimum input) and scale ``augment.local_crop_scale``, with view 2's light blur
    and solarisation. This follows solo-learn's multi-crop SwAV recipe
    (``scripts/pretrain/cifar-multicrop/augmentations/swav.yaml``: asymmetric global views, light
    blur on the local crops). The SwAV paper's own code applies one recipe to every crop
    (jitter 0.8/0.8/0.8/0.2, blur p=0.5, no solarisation); set ``augment.brightness/contrast/
    saturation: 0.8``, ``hue: 0.2``, ``blur_p: [0.5, 0.5]`` and ``solarize_p: [0, 0]`` for that.
    """
    a, s, side = config.augment, config.augment.strength, config.data.image_size
    blur = a.blur_p if a.blur_p is not None else [_scaled(None, p, s) for p in PAPER_BLUR_P]
    solarize = a.solarize_p if a.solarize_p is not None else [_scaled(None, p, s) for p in PAPER_SOLARIZE_P]

    def recipe(view: int, size: int, scale: Sequence[float]) -> ViewRecipe:
        return ViewRecipe(
            size=size,
            crop_scale=(scale[0], scale[1]),
            crop_ratio=(a.crop_ratio[0], a.crop_ratio[1]),
            flip_p=a.flip_p,
            jitter_p=_scaled(a.jitter_p, PAPER_JITTER_P, s),
            brightness=_scaled(a.brightness, PAPER_BRIGHTNESS, s, math.inf),
            contrast=_scaled(a.contrast, PAPER_CONTRAST, s, math.inf),
            saturation=_scaled(a.saturation, PAPER_SATURATION, s, math.inf),
            hue=_scaled(a.hue, PAPER_HUE, s, MAX_HUE),
            grayscale_p=_scaled(a.grayscale_p, PAPER_GRAYSCALE_P, s),
            blur_p=blur[view],
            solarize_p=solarize[view],
        )

    if config.method == "byol":
        return [recipe(0, side, a.crop_scale), recipe(1, side, a.crop_scale)]
    local_side = a.local_crop_size
    if local_side is None:
        local_side = max(round(side * 96 / 224), min_image_size(config.backbone))
    local = [recipe(1, local_side, a.local_crop_scale)] * a.num_local_crops
    return [recipe(0, side, a.global_crop_scale), recipe(1, side, a.global_crop_scale), *local]


_SCALED_OPS = ("jitter_p", "brightness", "contrast", "saturation", "hue", "grayscale_p")


def effective_ops(config: TrainConfig) -> dict[str, float | list[float]]:
    """The per-op ``augment.*`` fields as the views use them: a field left at ``None`` holds the value
    ``strength`` gives it (pairs are view 1, view 2), so ``config.replace(effective_ops(config))`` makes the
    same views."""
    first, second = view_recipes(config)[:2]
    return {
        **{f"augment.{name}": getattr(first, name) for name in _SCALED_OPS},
        "augment.blur_p": [first.blur_p, second.blur_p],
        "augment.solarize_p": [first.solarize_p, second.solarize_p],
    }


def blur_kernel_size(side: int) -> int:
    """About 10% of the image side, odd and at least 3 (BYOL and SwAV: 23 at 224)."""
    size = round(0.1 * side)
    return max(3, size if size % 2 else size + 1)


def build_view_transform(recipe: ViewRecipe) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``[3, S, S]`` -> float32 normalised ``[3, size, size]``, in BYOL's order.

    Crop, flip, colour jitter, grayscale, blur and solarisation run on uint8 (as the papers'
    PIL pipelines do), then the view is scaled to [0, 1] and standardised with ``MEAN``/``STD``.
    Ops with probability 0 are left out.
    """
    ops: list[Callable[..., torch.Tensor]] = [
        v2.RandomResizedCrop(recipe.size, scale=recipe.crop_scale, ratio=recipe.crop_ratio, antialias=True)
    ]
    if recipe.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(p=recipe.flip_p))
    magnitudes = (recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)
    if recipe.jitter_p > 0 and any(m > 0 for m in magnitudes):
        ops.append(v2.RandomApply([v2.ColorJitter(*magnitudes)], p=recipe.jitter_p))
    if recipe.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=recipe.grayscale_p))
    if recipe.blur_p > 0:
        blur = v2.GaussianBlur(blur_kernel_size(recipe.size), sigma=BLUR_SIGMA)
        ops.append(v2.RandomApply([blur], p=recipe.blur_p))
    if recipe.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=recipe.solarize_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)


def check_images(images: torch.Tensor, where: str) -> None:
    """Raise unless ``images`` is a uint8 RGB batch ``[N, 3, H, W]``; ``where`` names the caller."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{where}: images must be a uint8 tensor [N, 3, H, W], got {images.dtype} {tuple(images.shape)}; "
            "convert with (x * 255).round().to(torch.uint8) and expand grayscale to 3 channels"
        )


class PerSampleViews:
    """``augment.backend: per_sample``, the reference: each image through its torchvision v2 transforms, one by one.

    Called like :class:`~ssl_train.augment.batched.BatchedViews`: a uint8 batch in, one stacked view per recipe out.
    """

    def __init__(self, recipes: Sequence[ViewRecipe]) -> None:
        self.transforms = [build_view_transform(recipe) for recipe in recipes]

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        check_images(images, "PerSampleViews")
        return [torch.stack([transform(image) for image in images]) for transform in self.transforms]


class MultiViewDataset(Dataset):
    """Images in memory -> one augmented view per recipe, freshly drawn on every access."""

    def __init__(self, images: torch.Tensor, recipes: Sequence[ViewRecipe]) -> None:
        check_images(images, "MultiViewDataset")
        if not recipes:
            raise ValueError("MultiViewDataset: give at least one ViewRecipe (see view_recipes(config))")
        self.images = images
        self.recipes = list(recipes)
        self.transforms = [build_view_transform(recipe) for recipe in self.recipes]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image = self.images[index]
        return [transform(image) for transform in self.transforms]

    def __getitems__(self, indices: Sequence[int]) -> list[list[torch.Tensor]]:
        """A batch's samples (what ``DataLoader`` asks for), drawn with one intra-op thread.

        Per-image ops on 32x32 tensors gain nothing from torch's thread pool and lose much when
        the cores are shared: a two-view BYOL draw took ~10x the CPU time with 2 threads on a
        busy 2-core machine. ``DataLoader`` workers already run with one thread; this covers
        ``data.loader_workers = 0``, where augmentation runs in the training process.
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [self[index] for index in indices]
        finally:
            torch.set_num_threads(threads)
