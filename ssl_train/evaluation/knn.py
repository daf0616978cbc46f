"""The weighted kNN monitor (Wu et al. 2018) with k fitted to the labeled set, and the raw-pixel baseline."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ssl_train.config import EvalConfig
from ssl_train.evaluation.features import check_pair


@torch.no_grad()
def knn_vote_shares(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018, eq. 7): the k most cosine-similar train samples vote with weight exp(sim / T);
    returns each test sample's vote share per class, ``[M, num_classes]``, rows summing to 1.

    The weights are computed relative to each row's best similarity, which leaves the shares unchanged
    and keeps them finite for any temperature (float32 ``exp(1 / 0.01)`` is inf). ``k`` is clipped to the number
    of train samples.
    """
    check_pair(train_features, train_labels, "train")
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
    shares = []
    for chunk in test_features.split(chunk_size):
        similarity = F.normalize(chunk.float().to(train.device), dim=1) @ train.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=train.device)
        # exp((sim - max sim) / T): the same shares as exp(sim / T), finite at any T > 0 (no inf votes).
        votes.scatter_add_(1, labels[top_idx], ((top_sim - top_sim[:, :1]) / temperature).exp())
        shares.append(votes / votes.sum(dim=1, keepdim=True))
    return torch.cat(shares).cpu()


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> torch.Tensor:
    """The weighted kNN vote's class (:func:`knn_vote_shares`' argmax): int64 predictions ``[M]``."""
    return knn_vote_shares(train_features, train_labels, test_features, num_classes, k, temperature).argmax(dim=1)


def true_class_share(shares: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample, the share of the weighted kNN vote (:func:`knn_vote_shares`) that its true class gets, in [0, 1].

    Its mean (``knn_prob``) is the probability the vote assigns to the truth, a proper score: it moves with every
    vote, where accuracy moves only when a vote flips, so it has less sampling noise on a small val split.
    """
    if shares.dim() != 2 or labels.shape != shares.shape[:1]:
        raise ValueError(f"shares must be [M, C] and labels [M], got {list(shares.shape)} and {list(labels.shape)}")
    return shares.gather(1, labels.cpu().long()[:, None])[:, 0]


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
    check_pair(test_features, test_labels, "test")
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


def pixel_knn_accuracy(splits: Any, config: EvalConfig, split: str = "test") -> float:
    """The raw-pixel baseline: the same kNN protocol on flattened pixels (scaled to [0, 1]) instead of features."""
    held_out = getattr(splits, split)
    train = splits.eval_train.images.flatten(1).float() / 255
    train_labels = splits.eval_train.labels
    return knn_accuracy(train, train_labels, held_out.images.flatten(1).float() / 255, held_out.labels,
                        splits.num_classes, fitted_knn_k(config.knn_k, train_labels), config.knn_temperature)
