"""Splits: fixed, stratified eval-train / val / test sets of each source, and ``load_splits``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torchvision
from sklearn.model_selection import train_test_split

from ssl_train.config import DataConfig
from ssl_train.data.decode import _decode_records
from ssl_train.data.sets import DataError, DatasetSplits, ImageSet
from ssl_train.data.sources import (
    _any_records,
    _array_set,
    _digits_pool,
    _expand,
    _folder_records,
    _local_folder,
    _parquet_records,
    _torchvision_dataset,
)

# The split seed is a constant, not the run's seed: all trials compare on the same images.
SPLIT_SEED = 20201


def _hold_out(pool: ImageSet, fraction: float, what: str, notes: list[str]) -> tuple[ImageSet, ImageSet]:
    """Fixed split of a labeled set into (rest, held-out ``fraction``), stratified when every class allows."""
    index = np.arange(len(pool))
    labels = pool.labels.numpy()
    try:
        rest, held = train_test_split(index, test_size=fraction, stratify=labels, random_state=SPLIT_SEED)
    except ValueError as error:
        notes.append(f"{what} split not stratified ({error})")
        try:
            rest, held = train_test_split(index, test_size=fraction, random_state=SPLIT_SEED)
        except ValueError as error2:
            raise DataError(f"cannot make the {what} split of {len(pool)} labeled images: {error2}") from error2
    return pool.select(np.sort(rest)), pool.select(np.sort(held))


def _labeled_part(pool: ImageSet, fraction: float, notes: list[str]) -> ImageSet:
    """``data.labeled_fraction`` of ``pool`` (stratified, fixed); the pool itself when it is 1."""
    return pool if fraction >= 1.0 else _hold_out(pool, fraction, "labeled-fraction", notes)[1]


def _require_classes(num_classes: int, where: str) -> None:
    if num_classes < 2:
        raise DataError(
            f"'{where}' has {num_classes} class; evaluation needs labeled images of at least 2 classes "
            "(one sub-folder per class, or 2+ distinct values in a parquet 'label' column)"
        )


def _needs_labels(where: str) -> DataError:
    return DataError(
        f"'{where}' holds unlabeled images, but evaluation (kNN / linear-probe accuracy, the tuning objective) "
        "needs labeled ones: set data.labeled_path to a folder with one sub-folder per class "
        "(<labeled_path>/<class>/*.png) or to a parquet file with an integer 'label' column"
    )


def _digits_splits(config: DataConfig) -> DatasetSplits:
    notes: list[str] = []
    rest, test = _hold_out(_digits_pool(config.image_size), config.test_fraction, "test", notes)
    ssl_train, val = _hold_out(rest, config.val_fraction, "val", notes)
    eval_train = _labeled_part(ssl_train, config.labeled_fraction, notes)
    return DatasetSplits("digits", ssl_train, eval_train, val, test, 10, [], notes)


def _labeled_path_sets(
    config: DataConfig, skipped: list[str], notes: list[str]
) -> tuple[ImageSet, ImageSet, ImageSet, int]:
    """(eval pool, val set, test set, class count) from ``data.labeled_path``."""
    labeled_path = _expand(config.labeled_path or "")
    labeled_records = _any_records(labeled_path, "data.labeled_path")
    if not labeled_records.num_classes:
        raise _needs_labels(str(labeled_path))
    _require_classes(labeled_records.num_classes, str(labeled_path))
    rest, test = _hold_out(
        _decode_records(labeled_records, config.image_size, skipped), config.test_fraction, "test", notes
    )
    eval_pool, val = _hold_out(rest, config.val_fraction, "val", notes)
    return eval_pool, val, test, labeled_records.num_classes


def _file_splits(config: DataConfig) -> DatasetSplits:
    if not config.path:
        raise DataError(f"data.source={config.source!r} needs data.path (a folder or parquet file)")
    path = _expand(config.path)
    skipped: list[str] = []
    notes: list[str] = []
    if config.streaming:  # the SSL-train images reach the workers through Ray Data (ssl_train.streaming)
        eval_pool, val, test, num_classes = _labeled_path_sets(config, skipped, notes)
        eval_train = _labeled_part(eval_pool, config.labeled_fraction, notes)
        return DatasetSplits(str(path), None, eval_train, val, test, num_classes, skipped, notes)
    if config.source == "parquet":
        records = _parquet_records(path, "data.path")
    else:
        records = _folder_records(_local_folder(path, "data.path"), "data.path")
    main = _decode_records(records, config.image_size, skipped)
    if config.labeled_path:
        eval_pool, val, test, num_classes = _labeled_path_sets(config, skipped, notes)
        ssl_train = main
    elif records.num_classes:
        _require_classes(records.num_classes, str(path))
        rest, test = _hold_out(main, config.test_fraction, "test", notes)
        ssl_train, val = _hold_out(rest, config.val_fraction, "val", notes)
        eval_pool, num_classes = ssl_train, records.num_classes
    else:
        raise _needs_labels(str(path))
    eval_train = _labeled_part(eval_pool, config.labeled_fraction, notes)
    return DatasetSplits(str(path), ssl_train, eval_train, val, test, num_classes, skipped, notes)


def load_streamed_set(config: DataConfig) -> ImageSet:
    """The SSL-train images of a streamed config (``data.streaming``) decoded in this process, as the
    in-memory path holds them (with ``data.labeled_path`` set, all readable rows of ``data.path``)."""
    records = _parquet_records(_expand(config.path or ""), "data.path")
    return _decode_records(records, config.image_size, [])


def load_images(location: str, image_size: int) -> tuple[ImageSet, list[str], list[str]]:
    """Every readable image of a folder (class sub-folders or flat) or Parquet file/folder: the images
    (labels -1 where there are none), their names (file paths or ``file:row``) and the unreadable ones skipped."""
    records = _any_records(_expand(location), "IMAGES")
    skipped: list[str] = []
    images = _decode_records(records, image_size, skipped)
    dropped = set(skipped)
    return images, [name for name in records.names if name not in dropped], skipped


def _torchvision_splits(config: DataConfig) -> DatasetSplits:
    """CIFAR-10 (train -> SSL + eval, test) or STL-10 (unlabeled -> SSL, train -> eval, test).

    These have official test splits, so ``test_fraction`` is not used; val is carved out of the
    labeled train split (``val_fraction``), and for CIFAR-10 left out of the SSL-train images.
    """
    root = Path(config.download_root).expanduser()
    size = config.image_size
    notes: list[str] = []
    if config.source == "cifar10":
        train = _torchvision_dataset(torchvision.datasets.CIFAR10, "CIFAR-10", root, train=True)
        test = _torchvision_dataset(torchvision.datasets.CIFAR10, "CIFAR-10", root, train=False)
        ssl_train, val = _hold_out(
            _array_set(train.data, train.targets, size, channels_last=True), config.val_fraction, "val", notes
        )
        eval_pool = ssl_train
        test_set = _array_set(test.data, test.targets, size, channels_last=True)
    else:
        unlabeled = _torchvision_dataset(torchvision.datasets.STL10, "STL-10", root, split="unlabeled")
        train = _torchvision_dataset(torchvision.datasets.STL10, "STL-10", root, split="train")
        test = _torchvision_dataset(torchvision.datasets.STL10, "STL-10", root, split="test")
        ssl_train = _array_set(unlabeled.data, np.full(len(unlabeled.data), -1), size, channels_last=False)
        eval_pool, val = _hold_out(
            _array_set(train.data, train.labels, size, channels_last=False), config.val_fraction, "val", notes
        )
        test_set = _array_set(test.data, test.labels, size, channels_last=False)
    eval_train = _labeled_part(eval_pool, config.labeled_fraction, notes)
    return DatasetSplits(config.source, ssl_train, eval_train, val, test_set, 10, [], notes)


def load_splits(config: DataConfig) -> DatasetSplits:
    """Load and split the configured data.

    The splits are stratified and fixed for a dataset (the constant SPLIT_SEED, not the run's seed),
    so every trial and every confirmation seed is measured on the same val and test images.
    """
    if config.source == "digits":
        return _digits_splits(config)
    if config.source in ("cifar10", "stl10"):
        return _torchvision_splits(config)
    return _file_splits(config)
