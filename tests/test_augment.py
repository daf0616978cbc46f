"""Augmentations: BYOL's recipe at strength 1, the strength knob, overrides, multi-crop and the preview."""

import dataclasses

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from ssl_train.augment.preview import save_preview
from ssl_train.augment.recipes import (
    MultiViewDataset,
    ViewRecipe,
    blur_kernel_size,
    build_view_transform,
    effective_ops,
    normalize_batch,
    view_recipes,
)
from ssl_train.config import ConfigError, from_dict

RATIO = (3 / 4, 4 / 3)


def recipes(**augment):
    """BYOL's views with the paper's crop (the default crop is milder, 0.4-1)."""
    return view_recipes(from_dict({"augment": {"crop_scale": [0.08, 1.0], **augment}}))


def identity_recipe(size=16, **changes):
    """Every op off and the crop covering the whole image: the view is just the normalised input."""
    base = ViewRecipe(size, (1.0, 1.0), (1.0, 1.0), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    return dataclasses.replace(base, **changes)


def op_types(recipe):
    return [type(op) for op in build_view_transform(recipe).transforms]


def random_images(n=4, side=32, seed=0):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_strength_one_is_byols_recipe():
    view1, view2 = recipes()
    assert view1 == ViewRecipe(32, (0.08, 1.0), RATIO, 0.5, 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 1.0, 0.0)
    assert view2 == ViewRecipe(32, (0.08, 1.0), RATIO, 0.5, 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 0.1, 0.2)


def test_views_are_asymmetric_in_blur_and_solarisation_only():
    view1, view2 = recipes()
    assert dataclasses.replace(view2, blur_p=view1.blur_p, solarize_p=view1.solarize_p) == view1
    assert v2.RandomSolarize not in op_types(view1)  # p=0 is left out of the pipeline
    assert v2.RandomSolarize in op_types(view2)
    assert op_types(view1)[:5] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomApply,
                                   v2.RandomGrayscale, v2.RandomApply]  # BYOL's order: ..., jitter, gray, blur


def test_strength_zero_is_crop_and_flip_only():
    for view in recipes(strength=0.0):
        assert (view.jitter_p, view.grayscale_p, view.blur_p, view.solarize_p) == (0.0, 0.0, 0.0, 0.0)
        assert (view.brightness, view.contrast, view.saturation, view.hue) == (0.0, 0.0, 0.0, 0.0)
        assert (view.crop_scale, view.crop_ratio, view.flip_p) == ((0.08, 1.0), RATIO, 0.5)
        assert op_types(view) == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.Normalize]


def test_strength_two_doubles_magnitudes_and_clips_probabilities():
    view1, view2 = recipes(strength=2.0)
    assert (view1.brightness, view1.contrast, view1.saturation, view1.hue) == (0.8, 0.8, 0.4, 0.2)
    assert view1.jitter_p == 1.0  # 0.8 * 2 clipped
    assert view1.grayscale_p == 0.4
    assert (view1.blur_p, view2.blur_p) == (1.0, 0.2)  # 1.0 * 2 clipped
    assert (view1.solarize_p, view2.solarize_p) == (0.0, 0.4)
    assert view1.hue <= 0.5 and (view1.crop_scale, view1.flip_p) == ((0.08, 1.0), 0.5)


def test_per_op_override_beats_strength():
    view1, view2 = recipes(strength=2.0, grayscale_p=0.0, blur_p=[0.5, 0.5], brightness=0.1, flip_p=0.0)
    assert (view1.grayscale_p, view1.blur_p, view2.blur_p, view1.brightness, view1.flip_p) == (0.0, 0.5, 0.5, 0.1, 0.0)
    assert (view1.contrast, view1.jitter_p, view2.solarize_p) == (0.8, 1.0, 0.4)  # the rest follow strength
    assert v2.RandomGrayscale not in op_types(view1) and v2.RandomHorizontalFlip not in op_types(view1)


@pytest.mark.parametrize("augment", [{}, {"strength": 0.5}, {"strength": 2.0, "hue": 0.3, "blur_p": [0.2, 0.9]}])
def test_effective_ops_spell_out_what_strength_sets_and_make_the_same_views(augment):
    config = from_dict({"augment": augment})
    spelled = config.replace(effective_ops(config))
    assert view_recipes(spelled) == view_recipes(config)
    assert None not in [spelled.augment.jitter_p, spelled.augment.hue, spelled.augment.blur_p]
    if augment.get("strength") == 0.5:  # the paper's values halved (Table 6)
        assert effective_ops(config) == {
            "augment.jitter_p": 0.4, "augment.brightness": 0.2, "augment.contrast": 0.2, "augment.saturation": 0.1,
            "augment.hue": 0.05, "augment.grayscale_p": 0.1, "augment.blur_p": [0.5, 0.05],
            "augment.solarize_p": [0.0, 0.1],
        }


def test_swav_multi_crop_gives_two_global_and_v_local_views():
    config = from_dict({"method": "swav", "augment": {"num_local_crops": 4, "global_crop_scale": [0.14, 1.0]}})
    views = view_recipes(config)
    assert [v.size for v in views] == [32, 32, 14, 14, 14, 14]  # round(32 * 96 / 224) = 14
    assert [v.crop_scale for v in views] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 4
    assert [(v.blur_p, v.solarize_p) for v in views] == [(1.0, 0.0)] + [(0.1, 0.2)] * 5
    batch = next(iter(DataLoader(MultiViewDataset(random_images(6), views), batch_size=3)))
    assert [tuple(b.shape) for b in batch] == [(3, 3, 32, 32)] * 2 + [(3, 3, 14, 14)] * 4
    sized = view_recipes(from_dict({"method": "swav", "augment": {"num_local_crops": 2, "local_crop_size": 16}}))
    assert [v.size for v in sized] == [32, 32, 16, 16]
    assert len(view_recipes(from_dict({"method": "swav"}))) == 2


def test_view_with_every_op_off_equals_normalize_batch():
    images = random_images(3, side=16)
    dataset = MultiViewDataset(images, [identity_recipe(), identity_recipe(crop_ratio=RATIO)])
    for i in range(len(images)):
        for view in dataset[i]:
            assert view.dtype == torch.float32 and view.shape == (3, 16, 16)
            torch.testing.assert_close(view, normalize_batch(images[i : i + 1])[0], atol=1e-6, rtol=0)


def test_resized_view_has_the_recipe_size():
    view = build_view_transform(dataclasses.replace(recipes()[0], size=20))(random_images(1)[0])
    assert view.shape == (3, 20, 20) and view.dtype == torch.float32


def test_flip_p_zero_never_flips_and_half_flips_sometimes():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[:, :, :3] = 255  # bright left edge: a flip moves it to the right
    expected, flipped = normalize_batch(image[None])[0], normalize_batch(image.flip(-1)[None])[0]
    never = build_view_transform(identity_recipe(size=8, flip_p=0.0))
    assert all(torch.equal(never(image), expected) for _ in range(200))
    half = build_view_transform(identity_recipe(size=8, flip_p=0.5))
    outcomes = [torch.equal(half(image), flipped) for _ in range(200)]
    assert 0 < sum(outcomes) < 200


def test_solarize_inverts_pixels_at_or_above_128():
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).contiguous()
    view = build_view_transform(identity_recipe(solarize_p=1.0))(ramp)
    solarized = torch.where(ramp >= 128, 255 - ramp, ramp)
    torch.testing.assert_close(view, normalize_batch(solarized[None])[0], atol=1e-6, rtol=0)
    assert solarized.max() == 127


def test_blur_kernel_is_about_a_tenth_of_the_side_and_odd():
    assert [blur_kernel_size(s) for s in (8, 32, 96, 224)] == [3, 3, 11, 23]  # 23 at 224 as in BYOL/SwAV
    edge = torch.zeros(3, 32, 32, dtype=torch.uint8)
    edge[:, :, 16:] = 255
    blur = build_view_transform(identity_recipe(size=32, blur_p=1.0))
    torch.manual_seed(0)
    views = [blur(edge) for _ in range(20)]  # sigma ~U(0.1, 2): near 0.1 a 3x3 blur leaves uint8 pixels as they are
    assert sum(not torch.equal(view, normalize_batch(edge[None])[0]) for view in views) >= 10  # the edge is smoothed
    assert all(torch.equal(view[:, :, :14], views[0][:, :, :14]) for view in views)  # far from the edge: untouched


def test_dataset_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        MultiViewDataset(torch.rand(2, 3, 8, 8), [identity_recipe(size=8)])


def test_save_preview_writes_a_grid_png_and_is_repeatable(tmp_path):
    config = from_dict({})
    images = random_images(5)
    state = torch.get_rng_state()
    path = save_preview(config, images, tmp_path / "sub" / "a.png", num_images=4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    cell, pad = 128, 2  # 32 px upscaled x4; make_grid pads every tile by 2
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (3 * (cell + pad) + pad, 4 * (cell + pad) + pad)  # original + 2 views, 4 rows
    again = save_preview(config, images, tmp_path / "b.png", num_images=4, seed=3)
    other = save_preview(config, images, tmp_path / "c.png", num_images=4, seed=4)
    assert path.read_bytes() == again.read_bytes() != other.read_bytes()


@pytest.mark.parametrize(
    ("augment", "key"),
    [
        ({"strength": 3.0}, "augment.strength"),
        ({"blur_p": [0.5]}, "augment.blur_p"),
        ({"solarize_p": [0.0, 1.5]}, "augment.solarize_p"),
        ({"hue": 0.7}, "augment.hue"),
        ({"crop_scale": [0.0, 1.0]}, "augment.crop_scale"),
    ],
)
def test_bad_augmentation_values_are_config_errors(augment, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict({"augment": augment})


def test_batched_fetch_matches_single_fetch_and_restores_thread_count():
    dataset = MultiViewDataset(random_images(3), [identity_recipe(size=32)] * 2)
    threads = torch.get_num_threads()
    batch = dataset.__getitems__([2, 0])
    assert torch.get_num_threads() == threads
    assert len(batch) == 2 and all(len(views) == 2 for views in batch)
    torch.testing.assert_close(batch[0][1], dataset[2][0])  # identity views: deterministic
