"""The search's objectives against hand computations: the kNN vote share, alpha-ReQ, the rotation probe and the
bootstrap standard error (issue 33)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl_train.evaluation.knn import knn_predict, knn_vote_shares, true_class_share
from ssl_train.evaluation.label_free import alpha_exponent, alpha_req_score, eigenspectrum
from ssl_train.evaluation.resolution import bootstrap_se
from ssl_train.evaluation.rotation import orientation_informative, rotated_copies, rotation_probe_accuracy

TRAIN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
TRAIN_LABELS = torch.tensor([0, 1, 0])


def test_knn_vote_share_matches_a_hand_computation():
    """Query (1, 0): cosine 1 (class 0), 0 (class 1), 1/sqrt(2) (class 0); weights exp(sim / T), T = 0.5."""
    query = torch.tensor([[1.0, 0.0]])
    w0, w1, w2 = math.exp(1 / 0.5), math.exp(0 / 0.5), math.exp(2**-0.5 / 0.5)
    shares = knn_vote_shares(TRAIN, TRAIN_LABELS, query, num_classes=2, k=3, temperature=0.5)
    assert shares[0].tolist() == pytest.approx([(w0 + w2) / (w0 + w1 + w2), w1 / (w0 + w1 + w2)], rel=1e-6)
    both = knn_vote_shares(TRAIN, TRAIN_LABELS, torch.cat([query, query]), num_classes=2, k=3, temperature=0.5)
    truth = true_class_share(both, torch.tensor([0, 1]))
    assert truth.tolist() == pytest.approx([(w0 + w2) / (w0 + w1 + w2), w1 / (w0 + w1 + w2)], rel=1e-6)
    # k=1: all of the vote goes to the nearest neighbour's class
    assert knn_vote_shares(TRAIN, TRAIN_LABELS, query, 2, k=1, temperature=0.5)[0].tolist() == [1.0, 0.0]


def test_knn_vote_shares_sum_to_one_and_their_argmax_is_the_prediction():
    generator = torch.Generator().manual_seed(0)
    train, labels = torch.randn(50, 8, generator=generator), torch.randint(0, 4, (50,), generator=generator)
    queries = torch.randn(30, 8, generator=generator)
    shares = knn_vote_shares(train, labels, queries, 4, k=10, temperature=0.07)
    assert torch.allclose(shares.sum(dim=1), torch.ones(30))
    assert torch.equal(shares.argmax(dim=1), knn_predict(train, labels, queries, 4, k=10, temperature=0.07))


def spectrum_features(alpha: float, dims: int = 32, samples: int = 400) -> torch.Tensor:
    """Centred features whose covariance has eigenvalues exactly k^-alpha, k = 1..dims."""
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(samples, dims, generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(raw - raw.mean(dim=0))  # orthonormal columns, each orthogonal to the ones vector
    eigenvalues = torch.arange(1, dims + 1, dtype=torch.float64) ** -alpha
    return basis * (eigenvalues * (samples - 1)).sqrt()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_alpha_exponent_recovers_a_known_power_law(alpha):
    features = spectrum_features(alpha)
    expected = torch.arange(1, 33, dtype=torch.float64) ** -alpha
    assert torch.allclose(eigenspectrum(features)[:32], expected, rtol=1e-6)
    assert alpha_exponent(features) == pytest.approx(alpha, rel=1e-6)
    assert alpha_req_score(alpha) == pytest.approx(-abs(alpha - 1))


def test_alpha_exponent_of_a_collapsed_representation_is_infinitely_steep():
    collapsed = torch.randn(100, 1, dtype=torch.float64) * torch.ones(1, 16, dtype=torch.float64)
    assert alpha_exponent(collapsed) == math.inf and alpha_req_score(math.inf) == -math.inf


def one_bright_corner(count: int) -> torch.Tensor:
    """Images with a bright top-left corner and random dim pixels elsewhere: each rotation moves the corner."""
    images = torch.randint(0, 50, (count, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[:, :, 0, 0] = 255
    return images


def corner_features(images: torch.Tensor) -> torch.Tensor:
    """Which corner is bright: features that encode the rotation perfectly."""
    corners = images[:, 0, [0, 0, -1, -1], [0, -1, -1, 0]].float()
    return torch.nn.functional.one_hot(corners.argmax(dim=1), 4).float()


def test_rotation_probe_reads_features_that_encode_rotation_and_not_features_that_do_not():
    images = one_bright_corner(40)
    copies, labels, sources = rotated_copies(images)
    assert copies.shape == (160, 3, 8, 8) and labels.tolist() == [0] * 40 + [1] * 40 + [2] * 40 + [3] * 40
    assert sources.tolist() == list(range(40)) * 4
    assert rotation_probe_accuracy(corner_features, images) == 1.0
    # rotation-invariant features (the image's sorted pixel values): the probe can only guess (chance 0.25)
    invariant = rotation_probe_accuracy(lambda x: x.flatten(1).float().sort(dim=1).values[:, ::16], images)
    assert invariant < 0.4
    assert orientation_informative(1.0, 40) and not orientation_informative(0.26, 40)


def test_rotation_needs_square_images():
    with pytest.raises(ValueError, match="square"):
        rotated_copies(torch.zeros(2, 3, 8, 6, dtype=torch.uint8))


def test_bootstrap_se_of_images_matches_the_textbook_and_groups_widen_it():
    rng = np.random.default_rng(0)
    values = rng.normal(size=400)
    assert bootstrap_se(values, resamples=2000) == pytest.approx(values.std() / math.sqrt(400), rel=0.1)
    # 20 groups of 20 identical images: 20 independent values, so the SE is sqrt(20) times the naive one
    grouped = np.repeat(rng.normal(size=20), 20)
    groups = np.repeat(np.arange(20), 20)
    naive = bootstrap_se(grouped, resamples=2000)
    assert bootstrap_se(grouped, groups, resamples=2000) == pytest.approx(naive * math.sqrt(20), rel=0.15)
    assert bootstrap_se(np.ones(10), np.arange(10)) == 0.0
    assert math.isnan(bootstrap_se(np.arange(5.0), np.zeros(5)))


def test_the_search_table_marks_trials_within_noise_and_says_when_the_whole_search_is():
    import pandas as pd

    from ssl_train.status import Status
    from tuning.report import OBJECTIVE_SE, resolution_line, within_noise_of_best
    from tuning.trial import OBJECTIVE

    finished = [Status.FINISHED] * 3
    # 0.80 ± 0.01 against 0.78 ± 0.01: 0.02 < 1.96 * sqrt(2) * 0.01 = 0.0277, within noise; 0.70 is not
    table = pd.DataFrame({OBJECTIVE: [0.80, 0.78, 0.70], OBJECTIVE_SE: [0.01, 0.01, 0.01], "status": finished})
    assert within_noise_of_best(table).tolist() == [True, True, False]
    assert resolution_line(table) is None
    close = table.assign(**{OBJECTIVE: [0.80, 0.79, 0.785]})
    line = resolution_line(close)
    assert line.startswith("the 3 recipes tried differ by less than this val split can measure (±2.0 points")
    assert "more val groups" in line
    assert resolution_line(close.assign(**{OBJECTIVE_SE: float("nan")})) is None  # no standard errors logged


def test_the_rotation_objective_warns_on_images_without_an_up_and_not_on_digits():
    from types import SimpleNamespace

    from ssl_train.config import load_config
    from ssl_train.data import ImageSet, load_splits
    from tuning.objective import orientation_warning, resolve_objective

    base = load_config(overrides=["data.image_size=16", "backbone.width=16"])
    digits = load_splits(base.data)
    assert orientation_warning("rotation", base, digits) is None
    noise = torch.randint(0, 256, (300, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    textures = SimpleNamespace(val=ImageSet(noise, torch.full((300,), -1)))  # every rotation of noise is noise
    warning = orientation_warning("rotation", base, textures)
    assert warning.startswith("warning: --objective rotation: random-init features tell the val images' rotations")
    assert "(chance 0.25)" in warning and "--objective rankme" in warning
    assert orientation_warning("rankme", base, textures) is None  # only the rotation probe needs an up
    assert resolve_objective("auto", labeled=True) == "knn_acc" and resolve_objective("auto", False) == "rankme"
    assert resolve_objective("alpha_req", labeled=True) == "alpha_req"
