"""One evaluation of a frozen backbone on a held-out split: label-free scores, and with labels kNN (and a probe)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_train.config import EvalConfig
from ssl_train.evaluation.features import extract_features
from ssl_train.evaluation.knn import fitted_knn_k, knn_accuracy
from ssl_train.evaluation.label_free import effective_rank, embedding_std, rankme_sample
from ssl_train.evaluation.probe import linear_probe_accuracy


def evaluate_backbone(
    backbone: nn.Module,
    splits: Any,
    config: EvalConfig,
    device: torch.device | str = "cpu",
    split: str = "val",
    batch_size: int = 512,
) -> dict[str, float]:
    """RankMe and the feature std of one held-out split; with labels, also its kNN accuracy (and linear accuracy if
    ``config.linear_probe``) given ``splits.eval_train``, with k fitted to the labeled set (:func:`fitted_knn_k`).

    ``split`` is ``"val"`` (what a search selects on) or ``"test"`` (read once a run has finished; data with no
    labels has none); the metrics carry it in their names (``val_knn_acc``, ``test_linear_acc``, ``val_rankme``).

    ``rankme`` (:func:`effective_rank`, Garrido et al. 2023, eq. 1) scores the BACKBONE's features of a fixed sample
    of the split (:func:`rankme_sample`), not the projector's: the backbone's features are what users take away
    (``backbone.pt``, embeddings); the projector's output is shaped by the loss (BYOL's predictor target, SwAV's
    prototypes), and its rank says more about the head than about the representation.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r}: evaluate on 'val' or 'test'")
    held_out = getattr(splits, split)
    if held_out is None:
        raise ValueError(f"split={split!r}: the data has no labels, so it has no {split} split")
    sample = rankme_sample(len(held_out.images))
    if not splits.num_classes:  # no labels: the sample is all there is to score
        features = sampled = extract_features(backbone, held_out.images[sample], batch_size, device)
    else:
        features = extract_features(backbone, held_out.images, batch_size, device)
        sampled = features[sample]
    metrics = {"rankme": effective_rank(sampled), "feature_std": embedding_std(features)}
    if splits.num_classes:
        train = extract_features(backbone, splits.eval_train.images, batch_size, device)
        train_labels, labels = splits.eval_train.labels, held_out.labels
        metrics["knn_acc"] = knn_accuracy(train, train_labels, features, labels, splits.num_classes,
                                          fitted_knn_k(config.knn_k, train_labels), config.knn_temperature)
        if config.linear_probe:
            metrics["linear_acc"] = linear_probe_accuracy(train, train_labels, features, labels)
    return {f"{split}_{key}": value for key, value in metrics.items()}
