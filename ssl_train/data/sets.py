"""The set types: decoded images and the splits one run uses."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ssl_train.data.leaks import LeakCheck


class DataError(ValueError):
    """Data cannot be loaded; the message names the file/path/column and the fix."""


@dataclass(frozen=True, eq=False)
class Decoding:
    """One decoding of image files: how many were read (the unreadable ones too) and how long it took."""

    files: int
    seconds: float

    @property
    def rate(self) -> float:
        """Files decoded per second."""
        return self.files / max(self.seconds, 1e-9)


@dataclass
class ImageSet:
    """Decoded images, their labels and (with ``data.group_by``) their groups."""

    images: torch.Tensor  # uint8 [N, 3, S, S], RGB
    labels: torch.Tensor  # int64 [N]; -1 = unlabeled
    groups: Optional[np.ndarray] = None  # str [N]: what ties images together; None = each image its own group
    decoding: Optional[Decoding] = None  # the decoding the images come from (shared by its parts); None: arrays

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: np.ndarray) -> ImageSet:
        """The images at ``index`` (a copy)."""
        rows = torch.as_tensor(index, dtype=torch.long)
        groups = None if self.groups is None else self.groups[np.asarray(index, dtype=np.int64)]
        return ImageSet(self.images[rows], self.labels[rows], groups, self.decoding)

    def group_count(self) -> int:
        """How many groups the images come from (each image is one when there are no groups)."""
        return len(self) if self.groups is None else len(np.unique(self.groups))

    def __reduce__(self) -> tuple:
        """Pickled as numpy arrays, which pickle protocol 5 hands over out of band: Ray's object store keeps one copy
        of the decoded images per node, and every trial on the node reads it in place (``ray.get`` maps the shared
        memory; a torch tensor would be copied into each trial's own memory)."""
        return (_image_set_from_arrays, (np.ascontiguousarray(self.images.numpy()), self.labels.numpy(),
                                         self.groups, self.decoding))


def _image_set_from_arrays(images: np.ndarray, labels: np.ndarray, groups: Optional[np.ndarray],
                           decoding: Optional[Decoding]) -> ImageSet:
    """An :class:`ImageSet` over unpickled arrays, without copying them. From Ray's object store they are read-only
    (shared by every trial on the node): nothing writes decoded images in place."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), groups, decoding)


@dataclass
class DatasetSplits:
    """The sets one run uses: SSL-train images, and three disjoint labeled sets (only val without labels).

    ``eval_train`` is the kNN memory and the linear probe's training set (it may be the same object as
    ``ssl_train``); ``val`` gives the per-epoch objective that the search selects on; ``test`` is read
    only once a run has finished (a confirmation run or ``ssl-tune train``), never by search trials.
    ``val`` and ``test`` images are never among the SSL-train images.

    Data with no labels (``num_classes`` 0) has neither ``eval_train`` nor ``test``: ``val`` is a fixed sample
    of unlabeled images, held out for label-free scores (RankMe), and no accuracy can be measured.
    """

    name: str
    ssl_train: Optional[ImageSet]  # None: streamed to the workers by Ray Data (data.streaming)
    eval_train: Optional[ImageSet]  # None: no labels
    val: ImageSet
    test: Optional[ImageSet]  # None: no labels
    num_classes: int  # 0: no labels
    skipped: list[str]
    notes: list[str] = field(default_factory=list)
    leaks: Optional[LeakCheck] = None  # data.leak_check: near-copies of val/test images among the training images

    @property
    def labeled(self) -> bool:
        """True when the data has labels: eval-train and test exist, and accuracy can be measured."""
        return self.num_classes > 0

    def preview(self, count: int) -> torch.Tensor:
        """The first ``count`` training images (the labeled ones when the SSL-train set is streamed)."""
        shown = self.ssl_train if self.ssl_train is not None else self.eval_train
        return shown.images[:count]

    def summary(self) -> str:
        size = self.val.images.shape[-1]
        ssl = f"{len(self.ssl_train)} SSL-train" if self.ssl_train is not None else "SSL-train streamed by Ray Data"
        if self.eval_train is not None and self.test is not None:
            sets = (f"{len(self.eval_train)} eval-train, {len(self.val)} val, {len(self.test)} test images "
                    f"({self.num_classes} classes, {size}x{size})")
        else:
            sets = (f"{len(self.val)} val images ({size}x{size}), no labels: no accuracy can be measured (no kNN, "
                    "linear probe or test split); runs are scored by RankMe on the val images (--objective rankme)")
        decodings = {part.decoding for part in (self.ssl_train, self.eval_train, self.val, self.test)
                     if part is not None and part.decoding is not None}  # one per decoding: parts share theirs
        decoded = ""
        if decodings:
            total = Decoding(sum(d.files for d in decodings), sum(d.seconds for d in decodings))
            decoded = f"decoded {total.files} files in {total.seconds:.1f} s ({total.rate:.0f} images/s), "
        text = f"{self.name}: {ssl}, {sets}; {decoded}skipped {len(self.skipped)} unreadable"
        if self.skipped:
            more = len(self.skipped) - 3
            text += ": " + ", ".join(self.skipped[:3]) + (f" (+{more} more)" if more > 0 else "")
        if self.val.groups is not None:
            parts = [("SSL-train", self.ssl_train), ("eval-train", self.eval_train), ("val", self.val),
                     ("test", self.test)]
            text += "; groups: " + ", ".join(f"{part.group_count()} {name}" for name, part in parts if part is not None)
        if self.notes:
            text += "; note: " + "; ".join(self.notes)
        if self.leaks is not None:
            text += "\n" + self.leaks.describe()
            warning = self.leaks.warning()
            text += f"\n{warning}" if warning else ""
        return text
