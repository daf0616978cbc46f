"""Batched augmentation: a uint8 batch ``[B, 3, H, W]`` on the training device -> the method's views.

The same recipes as the per-sample reference path (:mod:`ssl_train.augment.recipes`, torchvision v2 per image),
with every random parameter drawn per sample at once and every op run on the whole batch, with no Python
loop over images. The parameters are drawn with the global CPU generator (so a seed gives the same views on
CPU and GPU, and checkpoints restore the stream); the pixels are computed on the images' device, in float32
on [0, 1] from the crop on, without the uint8 rounding the reference does after each op.

Per op, what matches torchvision (``tests/test_augment_batched.py`` checks each with the parameters fixed):

- crop + resize + flip: one separable resampling matrix per sample and axis, with PyTorch's antialiased
  bilinear weights (``aten/src/ATen/native/UpSample.h``, ``_compute_weights_aa``) restricted to the crop
  window, so ``resize(crop(x))`` exactly; the flip reverses the column matrix;
- colour jitter: brightness, contrast and saturation as torchvision's ``_blend`` with per-sample factors,
  hue through HSV, in a random order per sample (torchvision draws ``randperm(4)`` per image);
- grayscale (ITU-R 601-2 luma, torchvision's weights), Gaussian blur (per-sample sigma, reflect padding,
  separable kernel of :func:`~ssl_train.augment.recipes.blur_kernel_size`), solarisation at 128/255.

kornia's ``augmentation`` module was not used: its ``ColorJitter`` applies one op order to the whole batch,
not one per sample as the recipe does, and ``bench/throughput.py`` measures this module on the step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ssl_train.augment.recipes import (
    BLUR_SIGMA,
    MEAN,
    SOLARIZE_THRESHOLD,
    STD,
    PerSampleViews,
    ViewRecipe,
    blur_kernel_size,
    check_images,
    view_recipes,
)
from ssl_train.config import TrainConfig

CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # jitter ops, torchvision's ColorJitter order
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)  # jitter factors that leave an image unchanged


@dataclass
class ViewParams:
    """One view's random parameters, one row per sample (what torchvision draws per image)."""

    boxes: torch.Tensor  # int64 [B, 4]: top, left, height, width of the crop
    flip: torch.Tensor  # bool [B]
    factors: torch.Tensor  # float32 [B, 4]: brightness, contrast, saturation, hue; identity where not jittered
    order: torch.Tensor  # int64 [B, 4]: the jitter op applied at each position (a permutation per sample)
    jitter: torch.Tensor  # bool [B]
    grayscale: torch.Tensor  # bool [B]
    blur: torch.Tensor  # bool [B]
    sigma: torch.Tensor  # float32 [B]
    solarize: torch.Tensor  # bool [B]

    def to(self, device: torch.device) -> ViewParams:
        return ViewParams(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


def draw_crop_boxes(count: int, height: int, width: int, scale: Sequence[float],
                    ratio: Sequence[float]) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for ``count`` images at once: ``[count, 4]`` (top, left, h, w).

    Each image tries up to 10 boxes of area ``U(scale) * H * W`` and log-aspect ``U(log ratio)``, keeps the
    first that fits, and falls back to the central crop of the clamped ratio when none does.
    """
    log_ratio = torch.tensor(ratio, dtype=torch.float64).log()
    area = height * width * torch.empty(count, CROP_TRIES, dtype=torch.float64).uniform_(scale[0], scale[1])
    aspect = torch.empty(count, CROP_TRIES, dtype=torch.float64).uniform_(log_ratio[0], log_ratio[1]).exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w.gather(1, first)[:, 0], float(fallback_w))
    h = torch.where(found, h.gather(1, first)[:, 0], float(fallback_h))
    top = torch.where(found, (torch.rand(count, dtype=torch.float64) * (height - h + 1)).floor(), (height - h) // 2)
    left = torch.where(found, (torch.rand(count, dtype=torch.float64) * (width - w + 1)).floor(), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1).long()


def _uniform(count: int, low: float, high: float) -> torch.Tensor:
    return torch.empty(count).uniform_(low, high)


def draw_params(recipe: ViewRecipe, count: int, height: int, width: int) -> ViewParams:
    """Every random parameter of ``recipe`` for ``count`` images of ``height x width``, with torchvision's ranges:
    jitter factors ``U(max(0, 1 - m), 1 + m)`` (hue ``U(-m, m)``), blur sigma ``U(0.1, 2.0)``, each op applied
    with its probability."""
    r = recipe
    factors = torch.stack([
        _uniform(count, max(0.0, 1.0 - r.brightness), 1.0 + r.brightness),
        _uniform(count, max(0.0, 1.0 - r.contrast), 1.0 + r.contrast),
        _uniform(count, max(0.0, 1.0 - r.saturation), 1.0 + r.saturation),
        _uniform(count, -r.hue, r.hue),
    ], dim=1)
    jitter = torch.rand(count) < r.jitter_p
    factors = torch.where(jitter[:, None], factors, torch.tensor(IDENTITY_FACTORS))
    return ViewParams(
        boxes=draw_crop_boxes(count, height, width, r.crop_scale, r.crop_ratio),
        flip=torch.rand(count) < r.flip_p,
        factors=factors,
        order=torch.rand(count, 4).argsort(dim=1),
        jitter=jitter,
        grayscale=torch.rand(count) < r.grayscale_p,
        blur=torch.rand(count) < r.blur_p,
        sigma=_uniform(count, *BLUR_SIGMA),
        solarize=torch.rand(count) < r.solarize_p,
    )


def resize_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """``[B, out_size, in_size]``: row i resamples output pixel i from each sample's window ``[start, start + length)``.

    PyTorch's antialiased bilinear weights (``interpolate(..., antialias=True)``, as torchvision's resize):
    scale ``s = length / out_size``, centre ``s (i + 0.5)``, a triangle filter of support ``max(s, 1)``
    stretched by ``max(s, 1)``, truncated to the window and normalised to sum 1.
    """
    scale = (length.to(torch.float32) / out_size)[:, None]  # [B, 1]
    support = scale.clamp(min=1.0)
    centre = scale * (torch.arange(out_size, device=start.device, dtype=torch.float32) + 0.5)  # [B, out]
    low = (centre - support + 0.5).clamp(min=0).floor()
    high = torch.minimum((centre + support + 0.5).floor(), length[:, None].to(torch.float32))
    position = (torch.arange(in_size, device=start.device) - start[:, None]).to(torch.float32)[:, None, :]
    weights = (1.0 - ((position - centre[..., None] + 0.5) / support[..., None]).abs()).clamp(min=0)
    inside = (position >= low[..., None]) & (position < high[..., None])
    weights = torch.where(inside, weights, 0.0)
    return weights / weights.sum(dim=-1, keepdim=True)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int,
                 flip: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's box resized to ``size x size`` (and mirrored where ``flip``): ``W_rows @ image @ W_cols^T``."""
    rows = resize_weights(boxes[:, 0], boxes[:, 2], size, images.shape[-2])
    cols = resize_weights(boxes[:, 1], boxes[:, 3], size, images.shape[-1])
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    count, channels, height, width = images.shape
    resampled_cols = torch.bmm(images.reshape(count, channels * height, width), cols.transpose(1, 2))
    return rows[:, None] @ resampled_cols.view(count, channels, height, size)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` luma of RGB images in [0, 1]."""
    weights = torch.tensor(GRAY_WEIGHTS).view(1, 3, 1, 1).to(images.device, non_blocking=True)
    return (images * weights).sum(dim=1, keepdim=True)


def shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` turns in HSV (torchvision's ``adjust_hue``), saturation and value kept.

    RGB -> HSV as torchvision's ``_rgb_to_hsv``; back with ``c = v - (v - min) clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + 6 h) mod 6`` and n = 5, 3, 1 for R, G, B (the piecewise HSV formula, branch-free; v s = v - min).
    Selections are products with 0/1 masks: ``torch.where`` is ~10x slower on the CPU.
    """
    r, g, b = images.unbind(dim=1)
    value, low = images.aminmax(dim=1)[::-1]
    spread = value - low
    max_is_r = (value == r).float()
    max_is_g = (1.0 - max_is_r) * (value == g).float()
    max_is_b = 1.0 - max_is_r - max_is_g
    # The hue of a grey pixel (spread 0) is 0, and any hue error is scaled by the spread on the way back.
    hue = (max_is_r * (g - b) + max_is_g * (b - r + 2.0 * spread) + max_is_b * (r - g + 4.0 * spread))
    sixths = (hue / spread.clamp(min=1e-12) + (6.0 + 6.0 * shift[:, None, None]))[:, None]  # 6 h shifted, > 0
    n = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1).to(images.device, non_blocking=True)
    k = (n + sixths).remainder_(6.0)
    return value[:, None] - spread[:, None] * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 jitter: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ColorJitter`` with per-sample ``factors`` applied in each sample's ``order``.

    Brightness, contrast and saturation are ``clamp(f x + (1 - f) y)`` with y = 0, the mean luma, or the
    luma image; at each of the 4 positions one blend serves every sample whatever its op there. Hue runs
    on the samples whose op it is. The parameters may be on the CPU (then choosing those samples needs no
    device sync); they are moved to the images' device.
    """
    device = images.device
    order_on_device = order.to(device, non_blocking=True)
    op_at = order_on_device.view(-1, 4, 1, 1, 1)
    factor_at = factors.to(device, non_blocking=True).gather(1, order_on_device).view(-1, 4, 1, 1, 1)
    is_contrast, is_saturation = (op_at == CONTRAST).float(), (op_at == SATURATION).float()
    factor_at = torch.where(op_at == HUE, 1.0, factor_at)  # the blend leaves a hue sample as it is
    for position in range(4):
        luma = grayscale(images)
        towards = (is_contrast[:, position] * luma.mean(dim=(1, 2, 3), keepdim=True)
                   + is_saturation[:, position] * luma)  # 0 for brightness
        images = torch.lerp(towards, images, factor_at[:, position]).clamp_(0.0, 1.0)  # f x + (1 - f) y
        hued = (jitter & (order[:, position] == HUE) & (factors[:, HUE] != 0)).nonzero()[:, 0]
        if len(hued):
            shift = factors[hued, HUE].to(device, non_blocking=True)
            hued = hued.to(device, non_blocking=True)
            images.index_copy_(0, hued, shift_hue(images[hued], shift))
    return images


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` with one sigma per image: a normalised Gaussian of ``kernel_size`` taps,
    reflect padding, applied along the width then the height as weighted sums of shifted slices."""
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=images.device)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).view(-1, 1, 1, 1, kernel_size)
    height, width, pad = images.shape[-2], images.shape[-1], kernel_size // 2
    padded = F.pad(images, [pad, pad, pad, pad], mode="reflect")
    along_width = sum(kernel[..., j] * padded[..., j:j + width] for j in range(kernel_size))
    return sum(kernel[..., j] * along_width[..., j:j + height, :] for j in range(kernel_size))


def apply_view(images: torch.Tensor, size: int, params: ViewParams) -> torch.Tensor:
    """float [0, 1] images ``[B, 3, H, W]`` -> the normalised views ``[B, 3, size, size]``, in BYOL's op order:
    crop + flip, colour jitter, grayscale, blur, solarisation; then standardised with ``MEAN``/``STD``.

    ``params`` (one row per image, on the CPU) decide which ops run on which images without a device sync.
    """
    device = images.device
    on_device = params.to(device)
    views = resized_crop(images, on_device.boxes, size, on_device.flip).clamp_(0.0, 1.0)
    if params.jitter.any():
        views = color_jitter(views, params.factors, params.order, params.jitter)
    if params.grayscale.any():  # products with 0/1 masks select per sample: torch.where is ~10x slower on the CPU
        views = torch.lerp(views, grayscale(views), on_device.grayscale.float().view(-1, 1, 1, 1))
    blurred = params.blur.nonzero()[:, 0]
    if len(blurred):
        sigma = params.sigma[blurred].to(device, non_blocking=True)
        blurred = blurred.to(device, non_blocking=True)
        views.index_copy_(0, blurred, gaussian_blur(views[blurred], sigma, blur_kernel_size(size)))
    if params.solarize.any():  # x -> 1 - x at and above the threshold
        inverted = (views >= SOLARIZE_THRESHOLD / 255).float() * on_device.solarize.float().view(-1, 1, 1, 1)
        views = torch.addcmul(views, inverted, 1.0 - 2.0 * views)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1).to(device, non_blocking=True)
    std = torch.tensor(STD).view(1, 3, 1, 1).to(device, non_blocking=True)
    return (views - mean) / std


class BatchedViews:
    """``augment.backend: batched``: ``views = BatchedViews(recipes)(images)``, one view per recipe, for a uint8
    batch ``[B, 3, H, W]`` on any device; fresh parameters per call.

    Consecutive views of one size (BYOL's two, SwAV's global pair, its local crops) run as one batch of
    ``views x B`` samples, so each op runs once per size rather than once per view.
    """

    def __init__(self, recipes: Sequence[ViewRecipe]) -> None:
        if not recipes:
            raise ValueError("BatchedViews: give at least one ViewRecipe (see view_recipes(config))")
        self.recipes = list(recipes)

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        check_images(images, "BatchedViews")
        count, _, height, width = images.shape
        pixels = images.float() / 255.0
        views: list[torch.Tensor] = []
        for size, group in itertools.groupby(self.recipes, key=lambda recipe: recipe.size):
            drawn = [draw_params(recipe, count, height, width) for recipe in group]
            params = ViewParams(**{f.name: torch.cat([getattr(p, f.name) for p in drawn]) for f in fields(ViewParams)})
            views += apply_view(pixels.repeat(len(drawn), 1, 1, 1), size, params).split(count)
        return views


def build_augmenter(config: TrainConfig) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The views of ``config`` (:func:`~.recipes.view_recipes`) by ``augment.backend``: a uint8 batch in,
    one view batch per recipe out."""
    recipes = view_recipes(config)
    return BatchedViews(recipes) if config.augment.backend == "batched" else PerSampleViews(recipes)
