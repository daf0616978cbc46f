"""Evaluation of a frozen backbone: weighted kNN monitor, linear probe, RankMe (no labels needed) and collapse
monitors."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from ssl_train.augment import normalize_batch
from ssl_train.config import EvalConfig


@torch.no_grad()
def extract_features(
    backbone: nn.Module, images: torch.Tensor, batch_size: int = 512, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Backbone features of uint8 images ``[N, 3, S, S]`` as float32 ``[N, D]`` on the CPU.

    The backbone (already on ``device``) runs in eval mode, so BatchNorm uses its running
    statistics; its previous train/eval mode is restored afterwards.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    was_training = backbone.training
    backbone.eval()
    try:
        chunks = [
            backbone(normalize_batch(batch.to(device))).float().flatten(1).cpu()
            for batch in images.split(batch_size)
        ]
    finally:
        backbone.train(was_training)
    return torch.cat(chunks)


def _check_pair(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if features.dim() != 2 or labels.dim() != 1 or len(features) != len(labels):
        raise ValueError(
            f"{name}: features must be [N, D] and labels [N], got {list(features.shape)} and {list(labels.shape)}"
        )


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): the k most cosine-similar train samples vote with weight exp(sim / T).

    The weights are computed relative to each row's best similarity, which leaves the vote unchanged
    and keeps it finite for any temperature (float32 ``exp(1 / 0.01)`` is inf).

    ``k`` is clipped to the number of train samples. Returns int64 class predictions ``[M]``.
    """
    _check_pair(train_features, train_labels, "train")
    if test_features.dim() != 2 or test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"test features must be [M, {train_features.shape[1]}] like the train features, "
            f"got {list(test_features.shape)}"
        )
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if len(train_labels) and (train_labels.min() < 0 or train_labels.max() >= num_classes):
        raise ValueError(f"train labels must lie in [0, num_classes={num_classes}), got "
                         f"[{int(train_labels.min())}, {int(train_labels.max())}]")
    k = min(k, len(train_features))
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(train.device).long()
    predictions = []
    for chunk in test_features.split(chunk_size):
        similarity = F.normalize(chunk.float().to(train.device), dim=1) @ train.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=train.device)
        # exp((sim - max sim) / T): the same argmax as exp(sim / T), finite at any T > 0 (no inf votes).
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes.scatter_add_(1, labels[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions).cpu()


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` on the test set."""
    _check_pair(test_features, test_labels, "test")
    predictions = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return (predictions == test_labels.cpu()).float().mean().item()


def fitted_knn_k(k: int, train_labels: torch.Tensor) -> int:
    """``k`` clipped to the smallest class's count in the kNN memory, so no vote must reach into other classes.

    k=200 (Wu et al. 2018) assumes ~1,300 labeled images a class (ImageNet); with ~100 a class every vote
    spans two classes' worth of neighbours (digits at random init: 0.66 at k=200, 0.86 at k=20).
    """
    counts = torch.bincount(train_labels[train_labels >= 0].long())
    counts = counts[counts > 0]
    return max(1, min(k, int(counts.min()))) if len(counts) else k


def knn_protocol(config: EvalConfig, train_labels: torch.Tensor) -> str:
    """The kNN protocol as it is applied to this labeled set, for the console and MLflow."""
    k = fitted_knn_k(config.knn_k, train_labels)
    clipped = f" (eval.knn_k={config.knn_k} clipped to the smallest class)" if k < config.knn_k else ""
    return f"kNN k={k}{clipped} T={config.knn_temperature:g}"


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    seed: int = 0,
) -> float:
    """Linear evaluation: multinomial logistic regression on standardised frozen features, test accuracy."""
    _check_pair(train_features, train_labels, "train")
    _check_pair(test_features, test_labels, "test")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(train_features.float().cpu().numpy(), train_labels.cpu().numpy())
    return float(probe.score(test_features.float().cpu().numpy(), test_labels.cpu().numpy()))


def embedding_std(embeddings: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised embeddings times sqrt(d).

    Spread embeddings have std about 1/sqrt(d) per dimension, so this is about 1; a collapsed
    representation drives it to 0 (BYOL/SimSiam collapse monitor).
    """
    if embeddings.dim() != 2 or len(embeddings) < 2:
        raise ValueError(f"embeddings must be [N >= 2, d], got {list(embeddings.shape)}")
    z = F.normalize(embeddings.float(), dim=1)
    return (z.std(dim=0).mean() * math.sqrt(z.shape[1])).item()


def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023, eq. 1): exp(-sum p_k log p_k), p_k = sigma_k / ||sigma||_1 + eps, sigma the
    singular values of the embedding matrix.

    Lies in [1, min(N, D)]: 1 for a collapsed (rank-one) representation, r for r equal non-zero singular values.
    """
    if features.dim() != 2 or features.numel() == 0:
        raise ValueError(f"features must be a non-empty [N, D] matrix, got {list(features.shape)}")
    singular = torch.linalg.svdvals(features.double())
    p = singular / singular.sum().clamp_min(eps) + eps
    return (-(p * p.log()).sum()).exp().item()


RANKME_SAMPLES = 2048  # images RankMe is computed on (the paper uses ~25,600; the rank is at most min(N, D))


def rankme_sample(count: int, limit: int = RANKME_SAMPLES) -> torch.Tensor:
    """Fixed indices (seed 0, sorted) of at most ``limit`` of ``count`` images: every epoch of every trial scores
    RankMe on the same images, so the values compare."""
    if count <= limit:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(0))[:limit].sort().values


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


def pixel_knn_accuracy(splits: Any, config: EvalConfig, split: str = "test") -> float:
    """The raw-pixel baseline: the same kNN protocol on flattened pixels (scaled to [0, 1]) instead of features."""
    held_out = getattr(splits, split)
    train = splits.eval_train.images.flatten(1).float() / 255
    train_labels = splits.eval_train.labels
    return knn_accuracy(train, train_labels, held_out.images.flatten(1).float() / 255, held_out.labels,
                        splits.num_classes, fitted_knn_k(config.knn_k, train_labels), config.knn_temperature)
