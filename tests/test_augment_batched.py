"""The batched backend against torchvision: each op with its parameters fixed, the whole view, and the
parameter distributions (>= 10,000 draws each, compared by statistical tests with fixed seeds)."""

import dataclasses
import itertools
import math

import pytest
import torch
from scipy import stats
from test_augment import identity_recipe, random_images
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ssl_train.augment.batched import (
    BatchedViews,
    ViewParams,
    apply_view,
    build_augmenter,
    color_jitter,
    draw_crop_boxes,
    draw_params,
    gaussian_blur,
    grayscale,
    resized_crop,
    shift_hue,
)
from ssl_train.augment.recipes import MEAN, STD, PerSampleViews, blur_kernel_size, view_recipes
from ssl_train.config import from_dict

SOLARIZE_STEP = 2 * 128 / 255 - 1  # how far solarising moves a pixel at the threshold
DRAWS = 20_000
ALPHA = 0.001  # a fixed-seed draw that matches the recipe passes these tests; a wrong range or probability fails


def smooth_images(n=6, side=32, seed=0):
    """Natural-looking float images in [0, 1]: random colours blurred, so hue and contrast are meaningful."""
    noise = torch.rand(n, 3, side // 4, side // 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(noise, size=(side, side), mode="bilinear", align_corners=False)


BOXES = [  # top, left, height, width on a 32x32 image: full, tiny, tall, wide, corner, one pixel
    (0, 0, 32, 32), (10, 12, 5, 6), (0, 5, 32, 9), (7, 0, 11, 32), (20, 25, 12, 7), (3, 4, 1, 1),
]


@pytest.mark.parametrize("size", [32, 14, 48, 8])  # equal, up- and down-sampling
def test_resized_crop_equals_torchvision_within_one_lsb(size):
    images = random_images(len(BOXES))
    boxes = torch.tensor(BOXES)
    ours = resized_crop(images.float() / 255, boxes, size) * 255
    for k, (top, left, h, w) in enumerate(BOXES):
        reference_u8 = TF.resized_crop(images[k], top, left, h, w, [size, size], antialias=True)
        assert (ours[k].round() - reference_u8.float()).abs().max() <= 1
        reference_float = TF.resized_crop(images[k].float() / 255, top, left, h, w, [size, size], antialias=True)
        torch.testing.assert_close(ours[k] / 255, reference_float, atol=1e-5, rtol=0)


def test_flip_mirrors_the_crop_exactly():
    images, boxes = random_images(len(BOXES)).float() / 255, torch.tensor(BOXES)
    flip = torch.tensor([True, False, True, True, False, True])
    flipped, plain = resized_crop(images, boxes, 20, flip), resized_crop(images, boxes, 20)
    for k in range(len(BOXES)):
        expected = TF.horizontal_flip(plain[k]) if flip[k] else plain[k]
        torch.testing.assert_close(flipped[k], expected, atol=1e-6, rtol=0)


def test_grayscale_and_solarize_match_torchvision_on_uint8_within_one_lsb():
    images = random_images(6)
    pixels = images.float() / 255
    gray = grayscale(pixels).expand_as(pixels) * 255
    assert (gray.round() - TF.rgb_to_grayscale(images, num_output_channels=3).float()).abs().max() <= 1
    params = fixed_params(len(images), 32, solarize=torch.ones(len(images), dtype=torch.bool))
    view = apply_view(pixels, 32, params) * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert torch.equal((view * 255).round().to(torch.uint8), TF.solarize(images, 128))


@pytest.mark.parametrize("op, factor", [(0, 1.3), (0, 0.6), (1, 1.4), (1, 0.5), (2, 1.2), (2, 0.0), (3, 0.1),
                                        (3, -0.45)])
def test_each_jitter_op_equals_torchvision_on_float_images(op, factor):
    images = smooth_images()
    reference = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue][op](images, factor)
    if op == 3:
        ours = shift_hue(images, torch.full((len(images),), factor))
    else:
        factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(len(images), 1)
        factors[:, op] = factor
        order = torch.tensor([op, *(o for o in range(4) if o != op)]).repeat(len(images), 1)
        ours = color_jitter(images, factors, order, torch.ones(len(images), dtype=torch.bool))
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=0)


def test_jitter_follows_each_samples_own_op_order():
    images = smooth_images(n=24)
    orders = torch.tensor(list(itertools.permutations(range(4))))  # all 24 orders, one per sample
    factors = torch.tensor([1.35, 0.7, 1.5, 0.2]).repeat(24, 1)
    ours = color_jitter(images, factors, orders, torch.ones(24, dtype=torch.bool))
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k, order in enumerate(orders.tolist()):
        expected = images[k]
        for op in order:
            expected = ops[op](expected, factors[k, op].item())
        torch.testing.assert_close(ours[k], expected, atol=1e-4, rtol=0)
    assert (ours[0] - ours[-1]).abs().max() > 0.05  # the order matters, so the test can tell orders apart


@pytest.mark.parametrize("side", [32, 96])
def test_blur_equals_torchvision_per_sample_sigma(side):
    images = smooth_images(n=4, side=side) * 0.5 + torch.rand(4, 3, side, side) * 0.5
    sigma, kernel = torch.tensor([0.1, 0.7, 1.3, 2.0]), blur_kernel_size(side)
    ours = gaussian_blur(images, sigma, kernel)
    for k in range(4):
        reference = TF.gaussian_blur(images[k], [kernel, kernel], [sigma[k].item()] * 2)
        torch.testing.assert_close(ours[k], reference, atol=1e-5, rtol=0)


def fixed_params(n, side, **changes):
    params = ViewParams(
        boxes=torch.tensor([[0, 0, side, side]] * n), flip=torch.zeros(n, dtype=torch.bool),
        factors=torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(n, 1), order=torch.arange(4).repeat(n, 1),
        jitter=torch.zeros(n, dtype=torch.bool), grayscale=torch.zeros(n, dtype=torch.bool),
        blur=torch.zeros(n, dtype=torch.bool), sigma=torch.ones(n), solarize=torch.zeros(n, dtype=torch.bool),
    )
    return dataclasses.replace(params, **changes)


def reference_view(image, recipe, params, k):
    """One image through torchvision's functional ops with sample k's parameters, in the recipe's order."""
    top, left, h, w = params.boxes[k].tolist()
    x = TF.resized_crop(image, top, left, h, w, [recipe.size, recipe.size], antialias=True)
    if params.flip[k]:
        x = TF.horizontal_flip(x)
    if params.jitter[k]:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for op in params.order[k].tolist():
            x = ops[op](x, params.factors[k, op].item())
    if params.grayscale[k]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur[k]:
        x = TF.gaussian_blur(x, [blur_kernel_size(recipe.size)] * 2, [params.sigma[k].item()] * 2)
    if params.solarize[k]:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, MEAN, STD)


@pytest.mark.parametrize("augment", [{"strength": 1.0}, {"strength": 0.0}, {"strength": 2.0, "hue": 0.5},
                                     {"method": "swav", "num_local_crops": 2}])
def test_whole_view_equals_torchvision_with_the_same_parameters(augment):
    method = augment.pop("method", "byol")
    augment = {"crop_scale": [0.08, 1.0], "blur_p": [0.7, 0.7], "solarize_p": [0.5, 0.5], **augment}
    if augment.get("strength") != 0.0:
        augment |= {"jitter_p": 0.9, "grayscale_p": 0.3}
    recipes = view_recipes(from_dict({"method": method, "augment": augment}))
    images = smooth_images(n=16)
    torch.manual_seed(1)
    for recipe in recipes:
        params = draw_params(recipe, 16, 32, 32)
        ours = apply_view(images, recipe.size, params)
        assert ours.shape == (16, 3, recipe.size, recipe.size)
        for k in range(16):
            # back on the [0, 1] scale; float rounding may put a pixel at the solarisation threshold on either side
            diff = ((ours[k] - reference_view(images[k], recipe, params, k)) * torch.tensor(STD).view(3, 1, 1)).abs()
            assert diff.max() <= SOLARIZE_STEP + 1e-4
            assert (diff > 1e-4).float().mean() <= 0.005


def test_crop_boxes_follow_torchvisions_distribution():
    torch.manual_seed(0)
    for scale, ratio in [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (2.5, 4.0))]:  # the second falls back often
        ours = draw_crop_boxes(DRAWS, 32, 32, scale, ratio).double()
        crop = v2.RandomResizedCrop(32, scale=scale, ratio=ratio)
        reference = torch.tensor([_torchvision_box(crop) for _ in range(DRAWS)]).double()
        for column in range(4):  # top, left, height, width
            assert stats.ks_2samp(ours[:, column], reference[:, column]).pvalue > ALPHA, (scale, ratio, column)
        assert ((ours[:, 0] + ours[:, 2] <= 32) & (ours[:, 1] + ours[:, 3] <= 32) & (ours[:, 2:] >= 1).all(1)).all()


def _torchvision_box(crop):
    """The box torchvision v2's RandomResizedCrop draws for one 32x32 image."""
    params = crop.make_params([torch.zeros(3, 32, 32)])
    return params["top"], params["left"], params["height"], params["width"]


def test_parameter_draws_follow_the_recipe():
    recipe = view_recipes(from_dict({"augment": {"strength": 1.0}}))[1]  # view 2: blur 0.1, solarise 0.2
    torch.manual_seed(0)
    params = draw_params(recipe, DRAWS, 32, 32)
    for drawn, p in [(params.flip, recipe.flip_p), (params.jitter, recipe.jitter_p),
                     (params.grayscale, recipe.grayscale_p), (params.blur, recipe.blur_p),
                     (params.solarize, recipe.solarize_p)]:
        assert stats.binomtest(int(drawn.sum()), DRAWS, p).pvalue > ALPHA, p
    jittered = params.factors[params.jitter]
    assert (params.factors[~params.jitter] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()
    for column, magnitude, centre in [(0, recipe.brightness, 1), (1, recipe.contrast, 1), (2, recipe.saturation, 1),
                                      (3, recipe.hue, 0)]:
        low = max(0.0, centre - magnitude) if centre else -magnitude
        assert stats.kstest(jittered[:, column], stats.uniform(low, centre + magnitude - low).cdf).pvalue > ALPHA
    assert stats.kstest(params.sigma, stats.uniform(0.1, 1.9).cdf).pvalue > ALPHA
    counts = torch.unique(params.order, dim=0, return_counts=True)[1]
    assert len(counts) == math.factorial(4)  # every op order occurs, equally often
    assert stats.chisquare(counts.numpy()).pvalue > ALPHA


def test_batched_views_run_on_the_images_device_with_one_view_per_recipe():
    config = from_dict({"method": "swav", "augment": {"num_local_crops": 2, "local_crop_size": 16}})
    augment = build_augmenter(config)
    assert isinstance(augment, BatchedViews)
    views = augment(random_images(5))
    assert [tuple(v.shape) for v in views] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 2
    assert all(v.dtype == torch.float32 and v.device == torch.device("cpu") for v in views)
    assert not torch.equal(views[0], views[1])
    per_sample = build_augmenter(from_dict({"augment": {"backend": "per_sample"}}))
    assert isinstance(per_sample, PerSampleViews)
    with pytest.raises(ValueError, match=r"uint8 tensor \[N, 3, H, W\]"):
        augment(torch.rand(2, 3, 8, 8))


def test_identity_recipe_gives_the_normalised_input():
    images = random_images(6)
    (view,) = BatchedViews([identity_recipe(32)])(images)
    expected = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(view, expected, atol=1e-6, rtol=0)
