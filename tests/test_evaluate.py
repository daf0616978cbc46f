"""Evaluation on real features (sklearn's digits) and hand-computed examples."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from ssl_train.config import EvalConfig
from ssl_train.evaluation.evaluate import evaluate_backbone
from ssl_train.evaluation.features import extract_features
from ssl_train.evaluation.knn import fitted_knn_k, knn_accuracy, knn_predict, knn_protocol, pixel_knn_accuracy
from ssl_train.evaluation.label_free import effective_rank, embedding_std
from ssl_train.evaluation.probe import linear_probe_accuracy


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """Raw 64-d pixel features of the 1797 digits, stratified 70/30 split."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    return {"x_train": x_train, "x_test": x_test, "y_train": y_train, "y_test": y_test}


def _tensors(d: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(d["x_train"], dtype=torch.float32),
        torch.tensor(d["y_train"]),
        torch.tensor(d["x_test"], dtype=torch.float32),
        torch.tensor(d["y_test"]),
    )


class TinyConv(nn.Module):
    """A conv -> BN -> ReLU -> pooled backbone, with the ``feature_dim`` attribute backbones expose."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.feature_dim = width
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ---------------------------------------------------------------- kNN


def test_knn_k1_matches_sklearn_cosine_nearest_neighbour(digits):
    train, train_labels, test, test_labels = _tensors(digits)
    ours = knn_predict(train, train_labels, test, num_classes=10, k=1).numpy()
    reference = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(digits["x_train"], digits["y_train"])
    assert (ours == reference.predict(digits["x_test"])).mean() >= 0.995
    assert (ours == digits["y_test"]).mean() >= 0.95


def test_knn_weighted_k20_matches_sklearn_exp_weights(digits):
    train, train_labels, test, test_labels = _tensors(digits)
    ours = knn_accuracy(train, train_labels, test, test_labels, num_classes=10, k=20, temperature=0.1)
    reference = KNeighborsClassifier(
        n_neighbors=20, metric="cosine", weights=lambda distance: np.exp((1 - distance) / 0.1)
    ).fit(digits["x_train"], digits["y_train"])
    assert abs(ours - reference.score(digits["x_test"], digits["y_test"])) <= 0.01
    assert ours >= 0.95


def test_knn_k_is_clipped_to_the_train_set(digits):
    train, train_labels, test, _ = _tensors(digits)
    huge = knn_predict(train, train_labels, test, num_classes=10, k=10_000)
    exact = knn_predict(train, train_labels, test, num_classes=10, k=len(train))
    assert torch.equal(huge, exact)


def test_fitted_k_is_clipped_to_the_smallest_class():
    labels = torch.tensor([0] * 5 + [1] * 30 + [2] * 12 + [-1] * 3)  # -1: unlabeled, not a class
    assert fitted_knn_k(20, labels) == 5
    assert fitted_knn_k(3, labels) == 3
    assert fitted_knn_k(200, torch.tensor([0] * 300 + [1] * 250)) == 200
    assert knn_protocol(EvalConfig(), labels) == "kNN k=5 (eval.knn_k=20 clipped to the smallest class) T=0.07"
    assert knn_protocol(EvalConfig(knn_k=3), labels) == "kNN k=3 T=0.07"


def test_default_protocol_is_fitted_k20_at_t007():
    """The default kNN monitor is k=20, T=0.07, not the ImageNet k=200, T=0.1 (which blurs ~100-a-class sets)."""
    config = EvalConfig()
    assert (config.knn_k, config.knn_temperature) == (20, 0.07)


def test_knn_worked_example_on_the_circle():
    """Train points at 0 deg (class 0), 90 deg (class 1, radius 5) and 180 deg (class 1); query at 30 deg.

    Cosine similarities: cos 30 = 0.866, cos 60 = 0.5, cos 150 = -0.866.
    T = 1:  class 0 gets e^0.866 = 2.38; class 1 gets e^0.5 + e^-0.866 = 1.65 + 0.42 = 2.07 -> class 0.
    T = 10: class 0 gets e^0.0866 = 1.09; class 1 gets e^0.05 + e^-0.0866 = 1.05 + 0.92 = 1.97 -> class 1.
    k = 1 picks the 0 deg point: without L2 normalisation the radius-5 point (dot 2.5) would win.
    """
    angles = torch.tensor([0.0, 90.0, 180.0]) * math.pi / 180
    radii = torch.tensor([1.0, 5.0, 1.0])
    train = torch.stack([radii * angles.cos(), radii * angles.sin()], dim=1)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]])
    assert knn_predict(train, labels, query, num_classes=2, k=1).tolist() == [0]
    assert knn_predict(train, labels, query, num_classes=2, k=3, temperature=1.0).tolist() == [0]
    assert knn_predict(train, labels, query, num_classes=2, k=3, temperature=10.0).tolist() == [1]
    # k = 2 leaves out the 180 deg point: 2.38 vs 1.65 at T = 1.
    assert knn_predict(train, labels, query, num_classes=2, k=2, temperature=1.0).tolist() == [0]


def test_knn_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="test features"):
        knn_predict(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.randn(3, 6), num_classes=2)
    with pytest.raises(ValueError, match="num_classes=2"):
        knn_predict(torch.randn(5, 4), torch.arange(5), torch.randn(3, 4), num_classes=2)


# ---------------------------------------------------------------- linear probe


def test_linear_probe_on_digit_pixels(digits):
    assert linear_probe_accuracy(*_tensors(digits)) >= 0.93


def test_linear_probe_on_random_labels_is_at_chance(digits):
    train, train_labels, test, test_labels = _tensors(digits)
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(0))]
    assert linear_probe_accuracy(train, shuffled, test, test_labels) < 0.2


# ---------------------------------------------------------------- collapse monitors


def test_collapsed_embedding_is_flagged():
    generator = torch.Generator().manual_seed(0)
    collapsed = torch.randn(64, generator=generator) + 1e-6 * torch.randn(2000, 64, generator=generator)
    assert embedding_std(collapsed) < 0.05
    assert 1.0 <= effective_rank(collapsed) < 1.01


def test_spread_embedding_is_not_flagged():
    """Gaussian rows are uniform on the sphere once normalised: std 1/sqrt(d) per dimension, full rank.

    Measured: embedding_std 0.9999 (without the sqrt(d) factor 0.125, without normalising 8.0), rank 63.7.
    """
    spread = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0))
    assert abs(embedding_std(spread) - 1.0) < 0.1
    assert 0.9 * 64 < effective_rank(spread) <= 64
    assert abs(embedding_std(3.0 * spread) - embedding_std(spread)) < 1e-5  # scale-free


def test_effective_rank_worked_values():
    # singular values (3, 1): p = (0.75, 0.25), exp(entropy) = 1.7548
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(1.7548, abs=1e-3)
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0, abs=1e-4)
    generator = torch.Generator().manual_seed(0)
    rank5 = torch.randn(500, 5, generator=generator) @ torch.randn(5, 64, generator=generator)
    assert 4.0 < effective_rank(rank5) <= 5.0 + 1e-6


# ---------------------------------------------------------------- feature extraction and the full evaluation


def _digit_images(x: np.ndarray) -> torch.Tensor:
    """Digits (8x8, values 0-16) as uint8 RGB images [N, 3, 8, 8]."""
    gray = torch.tensor(x * 255.0 / 16.0).round().to(torch.uint8).view(-1, 1, 8, 8)
    return gray.expand(-1, 3, -1, -1).contiguous()


def test_extract_features_shape_and_mode_restored(digits):
    torch.manual_seed(0)
    backbone = TinyConv(width=8)
    images = _digit_images(digits["x_test"][:50])
    for training in (True, False):
        backbone.train(training)
        running_mean = backbone.body[1].running_mean.clone()
        features = extract_features(backbone, images, batch_size=16)
        assert features.shape == (50, backbone.feature_dim) and features.dtype == torch.float32
        assert backbone.training is training
        assert torch.equal(backbone.body[1].running_mean, running_mean)  # eval mode: BN statistics untouched
    # in eval mode each sample's features do not depend on its batch
    assert torch.allclose(features, extract_features(backbone, images, batch_size=50), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(backbone, images.float())


@pytest.mark.parametrize("linear_probe", [False, True])
def test_evaluate_backbone_on_digit_images(digits, linear_probe):
    splits = SimpleNamespace(
        eval_train=SimpleNamespace(images=_digit_images(digits["x_train"]), labels=torch.tensor(digits["y_train"])),
        val=SimpleNamespace(images=_digit_images(digits["x_test"][:50]), labels=torch.tensor(digits["y_test"][:50])),
        test=SimpleNamespace(images=_digit_images(digits["x_test"]), labels=torch.tensor(digits["y_test"])),
        num_classes=10,
    )
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten())  # random 1024-d features
    config = EvalConfig(knn_k=20, linear_probe=linear_probe)
    metrics = evaluate_backbone(backbone, splits, config, split="test", batch_size=256)
    expected = {"knn_acc", "knn_prob", "rankme", "alpha", "alpha_req", "feature_std"} | (
        {"linear_acc"} if linear_probe else set())
    expected |= {"knn_acc_se", "knn_prob_se"}  # the label-free scores' standard errors: only without labels
    assert set(metrics) == {f"test_{name}" for name in expected}
    assert metrics["test_knn_acc"] >= 0.9
    assert metrics["test_knn_acc"] >= metrics["test_knn_prob"] > 0.5  # the vote's share of the truth
    assert 0 < metrics["test_knn_prob_se"] < 0.05 and 0 < metrics["test_knn_acc_se"] < 0.05
    assert 1.0 < metrics["test_rankme"] <= len(digits["y_test"])
    assert 0.0 < metrics["test_feature_std"] < 1.5
    if linear_probe:
        assert metrics["test_linear_acc"] >= 0.9
    # The val split is another set of images, named as such: its rank is bounded by its 50 images.
    val = evaluate_backbone(backbone, splits, config, split="val", batch_size=256)
    assert set(val) == {f"val_{name}" for name in expected} and val["val_rankme"] <= 50
    with pytest.raises(ValueError, match="'val' or 'test'"):
        evaluate_backbone(backbone, splits, config, split="train")


def test_knn_vote_is_stable_at_a_tiny_temperature():
    """Two exact class-1 neighbours and one near class-0 neighbour: class 1 wins at any T > 0.

    Without subtracting the maximum, exp(1 / 0.01) overflows float32 and every vote is inf (argmax -> 0).
    """
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.99, 0.141]])
    labels = torch.tensor([1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    for temperature in (1.0, 0.1, 0.01, 1e-4):
        assert knn_predict(train, labels, query, num_classes=2, k=3, temperature=temperature).tolist() == [1]
    assert torch.isinf(torch.tensor(1.0 / 0.01).exp())  # the overflow the shift avoids


def test_evaluation_and_pixel_baseline_use_the_fitted_k():
    """40 images of class 0 (left half lit) and 2 of class 1 (right half lit). At a near-uniform vote (T=100)
    an unclipped k=20 outvotes every class-1 query with class-0 neighbours; k fitted to the smallest class (2)
    gets them all right, for the backbone's features and for raw pixels alike."""
    generator = torch.Generator().manual_seed(0)

    def lit(half: int, count: int) -> torch.Tensor:
        images = torch.zeros(count, 3, 8, 8, dtype=torch.uint8)
        images[..., half * 4:(half + 1) * 4] = torch.randint(200, 256, (count, 3, 8, 4), generator=generator,
                                                             dtype=torch.uint8)
        return images

    def labeled(images: list[torch.Tensor], labels: list[int]) -> SimpleNamespace:
        return SimpleNamespace(images=torch.cat(images), labels=torch.tensor(labels))

    splits = SimpleNamespace(
        eval_train=labeled([lit(0, 40), lit(1, 2)], [0] * 40 + [1] * 2),
        test=labeled([lit(0, 5), lit(1, 5)], [0] * 5 + [1] * 5), num_classes=2,
    )
    config = EvalConfig(knn_temperature=100.0)
    assert fitted_knn_k(config.knn_k, splits.eval_train.labels) == 2
    assert pixel_knn_accuracy(splits, config) == 1.0
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d((1, 2)), nn.Flatten())  # left and right means per channel
    assert evaluate_backbone(backbone, splits, config, split="test")["test_knn_acc"] == 1.0
    # the same features and pixels at an unclipped k=20: the two class-1 neighbours are outvoted
    pixels = splits.eval_train.images.flatten(1).float()
    unclipped = knn_accuracy(pixels, splits.eval_train.labels, splits.test.images.flatten(1).float(),
                             splits.test.labels, num_classes=2, k=20, temperature=100.0)
    assert unclipped == 0.5
