"""Linear evaluation: a linear probe on frozen features."""

from __future__ import annotations

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ssl_train.evaluation.features import check_pair


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    seed: int = 0,
) -> float:
    """Linear evaluation: multinomial logistic regression on standardised frozen features, test accuracy."""
    check_pair(train_features, train_labels, "train")
    check_pair(test_features, test_labels, "test")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(train_features.float().cpu().numpy(), train_labels.cpu().numpy())
    return float(probe.score(test_features.float().cpu().numpy(), test_labels.cpu().numpy()))
