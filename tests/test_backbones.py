"""Backbones: output shapes, the small-image stem, the minimum input sizes, channels_last and gradients."""

import pytest
import torch
from torch import nn

from ssl_train.config import BackboneConfig, min_image_size
from ssl_train.methods.backbones import build_backbone

CASES = [
    (BackboneConfig("small_cnn", width=8), 64),
    (BackboneConfig("small_cnn"), 256),
    (BackboneConfig("resnet18", small_image_stem=True), 512),
    (BackboneConfig("resnet18", small_image_stem=False), 512),
    (BackboneConfig("resnet50", small_image_stem=True), 2048),
]


def last_feature_map(backbone: nn.Module, images: torch.Tensor) -> torch.Size:
    """The spatial size entering the global average pool."""
    pool = backbone.avgpool if hasattr(backbone, "avgpool") else backbone[-2]
    seen = []
    handle = pool.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[-2:]))
    backbone(images)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize(("config", "dim"), CASES,
                         ids=[f"{c.name}-stem{c.small_image_stem}-w{c.width}" for c, _ in CASES])
def test_feature_dim_and_output_shape_at_min_32_and_64(config, dim):
    torch.manual_seed(0)
    backbone = build_backbone(config).eval()
    assert backbone.feature_dim == dim
    smallest = min_image_size(config)
    with torch.no_grad():
        for side in (smallest, 32, 64):
            features = backbone(torch.randn(2, 3, side, side))
            assert features.shape == (2, dim) and torch.isfinite(features).all()
        # min_image_size is the total stride: the smallest input that reaches the pool at 1x1, not below it
        assert last_feature_map(backbone, torch.randn(1, 3, smallest, smallest)) == (1, 1)
        assert last_feature_map(backbone, torch.randn(1, 3, 2 * smallest, 2 * smallest)) == (2, 2)


def test_small_image_stem_is_a_3x3_stride_1_conv_without_max_pool():
    small = build_backbone(BackboneConfig("resnet18", small_image_stem=True))
    assert (small.conv1.kernel_size, small.conv1.stride, small.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert small.conv1.bias is None and isinstance(small.maxpool, nn.Identity)
    imagenet = build_backbone(BackboneConfig("resnet18", small_image_stem=False))
    assert (imagenet.conv1.kernel_size, imagenet.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(imagenet.maxpool, nn.MaxPool2d) and isinstance(imagenet.fc, nn.Identity)
    assert "conv1.weight" in small.state_dict() and "layer4.1.bn2.weight" in small.state_dict()  # torchvision keys


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_channels_last_input_gives_the_same_features(name):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name)).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = backbone(images)
        backbone.to(memory_format=torch.channels_last)
        got = backbone(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name)).train()
    features = backbone(torch.randn(4, 3, 16, 16))
    (features - torch.randn_like(features)).square().mean().backward()
    for param_name, param in backbone.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, param_name


def test_small_cnn_width_sets_its_widths():
    backbone = build_backbone(BackboneConfig("small_cnn", width=4))
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 32]
    assert [c.stride for c in convs] == [(1, 1), (2, 2), (2, 2), (2, 2)]
