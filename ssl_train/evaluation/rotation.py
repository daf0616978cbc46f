"""SelfAugment's label-free score (Reed et al. 2021, Sec. 3): how well a linear probe on frozen features predicts
the rotation (0, 90, 180, 270 degrees) of held-out images.

It ranks augmentation policies like supervised linear evaluation where images have an "up". On images without
one (textures, satellite tiles, microscopy) rotated copies look alike and the probe stays at chance, whatever the
features: :func:`orientation_informative` tells the two apart before a sweep relies on it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROTATIONS = 4
ROTATION_SAMPLES = 512  # images whose 4 rotations the probe sees (a fixed sample: every trial scores the same ones)
FOLDS = 4


def rotated_copies(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The 4 rotations of square images ``[N, C, S, S]``: images ``[4N, C, S, S]``, rotation labels 0-3, and the
    index of the source image of each copy (the probe's cross-validation keeps an image's copies in one fold)."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square images [N, C, S, S], got {list(images.shape)}")
    copies = torch.cat([torch.rot90(images, quarter, dims=(-2, -1)) for quarter in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS).repeat_interleave(len(images))
    return copies, labels, np.tile(np.arange(len(images)), ROTATIONS)


def rotation_probe_accuracy(
    features_of: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, limit: int = ROTATION_SAMPLES,
) -> float:
    """Held-out accuracy (chance 0.25) of a linear probe predicting each image copy's rotation from
    ``features_of(copies)``, cross-validated over ``FOLDS`` folds of source images, on a fixed sample of
    at most ``limit`` images."""
    if len(images) < FOLDS:
        raise ValueError(f"the rotation probe needs at least {FOLDS} images, got {len(images)}")
    if len(images) > limit:
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:limit].sort().values]
    copies, labels, sources = rotated_copies(images)
    features = features_of(copies).float().cpu().numpy()
    correct = 0
    for train, held in GroupKFold(n_splits=FOLDS).split(features, labels.numpy(), sources):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
        probe.fit(features[train], labels.numpy()[train])
        correct += int((probe.predict(features[held]) == labels.numpy()[held]).sum())
    return correct / len(labels)


def orientation_informative(accuracy_at_random_init: float, images: int, z: float = 3.0) -> bool:
    """Whether a rotation probe on random-init features beats chance (0.25) by more than ``z`` binomial standard
    errors over the ``4 * images`` copies: if even random features tell the rotations apart, orientation carries
    information; if they cannot, the images look alike at every rotation and the rotation score means nothing."""
    copies = ROTATIONS * min(images, ROTATION_SAMPLES)
    chance = 1 / ROTATIONS
    return accuracy_at_random_init > chance + z * (chance * (1 - chance) / copies) ** 0.5
