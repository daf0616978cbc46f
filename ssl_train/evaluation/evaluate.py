"""One evaluation of a frozen backbone on a held-out split: label-free scores, and with labels kNN (and a probe)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_train.config import EvalConfig
from ssl_train.evaluation.features import extract_features
from ssl_train.evaluation.knn import fitted_knn_k, knn_vote_shares, true_class_share
from ssl_train.evaluation.label_free import (
    alpha_exponent,
    alpha_req_score,
    effective_rank,
    embedding_std,
    rankme_sample,
)
from ssl_train.evaluation.resolution import bootstrap_se, bootstrap_statistic_se


def evaluate_backbone(
    backbone: nn.Module,
    splits: Any,
    config: EvalConfig,
    device: torch.device | str = "cpu",
    split: str = "val",
    batch_size: int = 256,
    bf16: bool = False,
) -> dict[str, float]:
    """The label-free scores of one held-out split (RankMe, alpha-ReQ, the feature std, and the rotation probe if
    ``config.rotation_probe``); with labels, also its kNN accuracy and the kNN vote's share for the true class
    (``knn_prob``), and linear accuracy if ``config.linear_probe``, given ``splits.eval_train``, with k fitted to the
    labeled set (:func:`fitted_knn_k`). Each score a search may rank by has its standard error (``<name>_se``).

    ``split`` is ``"val"`` (what a search selects on) or ``"test"`` (read once a run has finished; data with no
    labels has none); the metrics carry it in their names (``val_knn_acc``, ``test_linear_acc``, ``val_rankme``).

    ``rankme`` (:func:`effective_rank`, Garrido et al. 2023, eq. 1) scores the BACKBONE's features of a fixed sample
    of the split (:func:`rankme_sample`), not the projector's: the backbone's features are what users take away
    (``backbone.pt``, embeddings); the projector's output is shaped by the loss (BYOL's predictor target, SwAV's
    prototypes), and its rank says more about the head than about the representation.

    ``bf16``: features under bf16 autocast, as the training step runs (:func:`extract_features`).
    """
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r}: evaluate on 'val' or 'test'")
    held_out = getattr(splits, split)
    if held_out is None:
        raise ValueError(f"split={split!r}: the data has no labels, so it has no {split} split")
    sample = rankme_sample(len(held_out.images))
    if not splits.num_classes:  # no labels: the sample is all there is to score
        features = sampled = extract_features(backbone, held_out.images[sample], batch_size, device, bf16)
    else:
        features = extract_features(backbone, held_out.images, batch_size, device, bf16)
        sampled = features[sample]
    groups = getattr(held_out, "groups", None)  # None: each image its own group
    metrics = {**label_free_scores(sampled, None if groups is None else groups[sample.numpy()],
                                   with_se=not splits.num_classes), "feature_std": embedding_std(features)}
    # The probes import scikit-learn (and SciPy): ~0.8 s that every trial process would pay at start, used or not.
    if config.rotation_probe:
        from ssl_train.evaluation.rotation import rotation_probe_accuracy

        metrics["rotation"] = rotation_probe_accuracy(lambda x: extract_features(backbone, x, batch_size, device, bf16),
                                                      held_out.images)
    if splits.num_classes:
        train = extract_features(backbone, splits.eval_train.images, batch_size, device, bf16)
        metrics |= knn_scores(train, splits.eval_train.labels, features, held_out.labels, groups, splits.num_classes,
                              config)
        if config.linear_probe:
            from ssl_train.evaluation.probe import linear_probe_accuracy

            metrics["linear_acc"] = linear_probe_accuracy(train, splits.eval_train.labels, features, held_out.labels)
    return {f"{split}_{key}": value for key, value in metrics.items()}


def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
               groups: Any, num_classes: int, config: EvalConfig) -> dict[str, float]:
    """kNN accuracy and the vote's share for the true class (``knn_prob``) of the held-out images, each with its
    standard error by bootstrap over the held-out groups (``_se``)."""
    shares = knn_vote_shares(train, train_labels, features, num_classes, fitted_knn_k(config.knn_k, train_labels),
                             config.knn_temperature)
    labels = labels.long()
    per_image = {"knn_acc": (shares.argmax(dim=1) == labels).double().numpy(),
                 "knn_prob": true_class_share(shares, labels).double().numpy()}
    scores = {name: float(values.mean()) for name, values in per_image.items()}
    return scores | {f"{name}_se": bootstrap_se(values, groups) for name, values in per_image.items()}


def label_free_scores(features: torch.Tensor, groups: Any, with_se: bool = True) -> dict[str, float]:
    """RankMe and alpha-ReQ of a sample of held-out features; ``with_se``, their standard errors by bootstrap over
    groups (an SVD a resample: computed where there are no labels, where these scores are what a search ranks by)."""
    alpha = alpha_exponent(features)
    scores = {"rankme": effective_rank(features), "alpha": alpha, "alpha_req": alpha_req_score(alpha)}
    if with_se:
        scores["rankme_se"] = bootstrap_statistic_se(features, effective_rank, groups)
        scores["alpha_req_se"] = bootstrap_statistic_se(features, lambda f: alpha_req_score(alpha_exponent(f)), groups)
    return scores
