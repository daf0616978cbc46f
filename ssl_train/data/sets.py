"""The set types: decoded images and the splits one run uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


class DataError(ValueError):
    """Data cannot be loaded; the message names the file/path/column and the fix."""


@dataclass
class ImageSet:
    """Decoded images and their labels."""

    images: torch.Tensor  # uint8 [N, 3, S, S], RGB
    labels: torch.Tensor  # int64 [N]; -1 = unlabeled

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: np.ndarray) -> ImageSet:
        """The images at ``index`` (a copy)."""
        rows = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[rows], self.labels[rows])


@dataclass
class DatasetSplits:
    """The sets one run uses: SSL-train images, and three disjoint labeled sets.

    ``eval_train`` is the kNN memory and the linear probe's training set (it may be the same object as
    ``ssl_train``); ``val`` gives the per-epoch objective that the search selects on; ``test`` is read
    only once a run has finished (a confirmation run or ``ssl-tune train``), never by search trials.
    ``val`` and ``test`` images are never among the SSL-train images.
    """

    name: str
    ssl_train: Optional[ImageSet]  # None: streamed to the workers by Ray Data (data.streaming)
    eval_train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    skipped: list[str]
    notes: list[str] = field(default_factory=list)

    def preview(self, count: int) -> torch.Tensor:
        """The first ``count`` training images (the labeled ones when the SSL-train set is streamed)."""
        shown = self.ssl_train if self.ssl_train is not None else self.eval_train
        return shown.images[:count]

    def summary(self) -> str:
        size = self.test.images.shape[-1]
        ssl = f"{len(self.ssl_train)} SSL-train" if self.ssl_train is not None else "SSL-train streamed by Ray Data"
        text = (
            f"{self.name}: {ssl}, {len(self.eval_train)} eval-train, {len(self.val)} val, "
            f"{len(self.test)} test images ({self.num_classes} classes, {size}x{size}); "
            f"skipped {len(self.skipped)} unreadable"
        )
        if self.skipped:
            more = len(self.skipped) - 3
            text += ": " + ", ".join(self.skipped[:3]) + (f" (+{more} more)" if more > 0 else "")
        if self.notes:
            text += "; note: " + "; ".join(self.notes)
        return text
