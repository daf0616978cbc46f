"""Splits: fixed, stratified eval-train / val / test sets of each source, and ``load_splits``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchvision

from ssl_train.config import DataConfig
from ssl_train.data.decode import _decode_records
from ssl_train.data.group_by import GroupBy, GroupByError, parse_group_by
from ssl_train.data.leaks import check_leaks
from ssl_train.data.sets import DataError, DatasetSplits, ImageSet
from ssl_train.data.sources import (
    EMBEDDED_POOLS,
    _any_records,
    _array_set,
    _expand,
    _folder_records,
    _local_folder,
    _parquet_records,
    _torchvision_dataset,
)

# The split seed is a constant, not the run's seed: all trials compare on the same images.
SPLIT_SEED = 20201


def _hold_out(
    pool: ImageSet, fraction: float, what: str, notes: list[str], class_names: Optional[list[str]] = None,
    by_group: bool = True,
) -> tuple[ImageSet, ImageSet]:
    """Fixed split of a labeled set into (rest, held-out ``fraction``), stratified when every class allows;
    by group when the images have groups (and ``by_group``)."""
    if pool.groups is not None and by_group:
        rest, held = _group_fold(pool.labels.numpy(), pool.groups, fraction, what, class_names or [])
        return pool.select(np.sort(rest)), pool.select(np.sort(held))
    from sklearn.model_selection import train_test_split  # here, as in _group_fold: trial processes skip sklearn

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


def _group_fold(
    labels: np.ndarray, groups: np.ndarray, fraction: float, what: str, class_names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held-out) indices with no group on both sides: the held-out part is one of ``round(1 / fraction)``
    folds of scikit-learn's StratifiedGroupKFold (fixed seed), the first that leaves every class on both sides."""
    from sklearn.model_selection import StratifiedGroupKFold  # here: scikit-learn and SciPy cost ~0.8 s at import

    folds = _fold_count(fraction)
    classes = np.unique(labels)
    if len(np.unique(groups)) >= folds:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=SPLIT_SEED)
        for rest, held in splitter.split(labels, labels, groups):
            if all(np.isin(classes, labels[part]).all() for part in (rest, held)):
                return rest, held
    name, count = _fewest_groups(labels, groups, class_names)
    raise DataError(
        f"cannot make the {what} split by group (data.group_by): class '{name}' has {count} group(s) among the "
        f"{len(labels)} images this split divides, and data.{what}_fraction={fraction} holds out 1 of {folds} "
        f"stratified group folds, so each class needs about {folds} groups or more to be in both parts. "
        f"{_GROUP_FIX.format(name=name, more=_FEWER_FOLDS)}"
    )


def _fold_count(fraction: float) -> int:
    """The group folds a held-out ``fraction`` is one of."""
    return max(2, round(1 / fraction))


_GROUP_FIX = "Fix: add images from more groups to class '{name}', {more}use a finer data.group_by, or leave it out"
_FEWER_FOLDS = "raise data.test_fraction / data.val_fraction (fewer folds), "


def _fewest_groups(labels: np.ndarray, groups: np.ndarray, class_names: list[str]) -> tuple[str, int]:
    """The class with the fewest groups (its name) and its group count."""
    counts = {int(c): len(np.unique(groups[labels == c])) for c in np.unique(labels)}
    fewest = min(counts, key=counts.__getitem__)
    return (class_names[fewest] if fewest < len(class_names) else str(fewest)), counts[fewest]


def _val_test(
    pool: ImageSet, config: DataConfig, notes: list[str], class_names: Optional[list[str]] = None
) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(rest, val, test) of a labeled pool: test first, then val from the rest (by group when it has groups)."""
    if pool.groups is not None:
        name, count = _fewest_groups(pool.labels.numpy(), pool.groups, class_names or [])
        if count < 3:
            raise DataError(f"class '{name}' has {count} group(s) (data.group_by); a grouped split needs at least "
                            f"3 in every class, as eval-train, val and test each get whole groups. "
                            f"{_GROUP_FIX.format(name=name, more='')}")
    rest, test = _hold_out(pool, config.test_fraction, "test", notes, class_names)
    rest, val = _hold_out(rest, config.val_fraction, "val", notes, class_names)
    return rest, val, test


def _labeled_part(pool: ImageSet, fraction: float, notes: list[str]) -> ImageSet:
    """``data.labeled_fraction`` of ``pool`` (stratified by image, fixed: a subset of one split needs no groups);
    the pool itself when it is 1."""
    return pool if fraction >= 1.0 else _hold_out(pool, fraction, "labeled-fraction", notes, by_group=False)[1]


def _without_groups_of(images: ImageSet, held: list[ImageSet], notes: list[str]) -> ImageSet:
    """``images`` less those whose group is in one of the ``held`` sets (val, test)."""
    if images.groups is None:
        return images
    keep = ~np.isin(images.groups, np.concatenate([part.groups for part in held if part.groups is not None]))
    if keep.all():
        return images
    if not keep.any():
        raise DataError(f"every one of the {len(images)} data.path images shares its group (data.group_by) with a "
                        "val or test image; put images of other groups in data.path")
    notes.append(f"{int((~keep).sum())} data.path images left out of SSL-train: their groups are in val or test")
    return images.select(np.flatnonzero(keep))


def _group_by(config: DataConfig) -> Optional[GroupBy]:
    """``data.group_by`` parsed (None when unset)."""
    if config.group_by is None:
        return None
    if config.source not in ("folder", "parquet") or config.streaming:
        raise DataError(f"data.group_by={config.group_by!r} needs data.source=folder or parquet, not streamed")
    try:
        return parse_group_by(config.group_by)
    except GroupByError as error:
        raise DataError(f"data.group_by={config.group_by!r} is invalid; {error}") from None


def _require_classes(num_classes: int, where: str) -> None:
    if num_classes < 2:
        raise DataError(
            f"'{where}' has {num_classes} class; evaluation needs labeled images of at least 2 classes "
            "(one sub-folder per class, or 2+ distinct values in a parquet 'label' column)"
        )


def _needs_labels(where: str) -> DataError:
    return DataError(
        f"data.labeled_path='{where}' holds unlabeled images, but it is there for evaluation (kNN / linear-probe "
        "accuracy): give a folder with one sub-folder per class (<labeled_path>/<class>/*.png) or a parquet file "
        "with an integer 'label' column; without labels, leave data.labeled_path unset (scored by RankMe)"
    )


def _unlabeled_splits(name: str, pool: ImageSet, config: DataConfig, skipped: list[str],
                      notes: list[str]) -> DatasetSplits:
    """Data with no labels: ``data.val_fraction`` of the images (whole groups with ``data.group_by``) held out as the
    fixed val sample that label-free scores (RankMe) read, the rest SSL-train; no eval-train or test set."""
    folds = _fold_count(config.val_fraction)
    if pool.groups is not None and pool.group_count() < folds:
        raise DataError(
            f"cannot hold out the val sample by group (data.group_by): the {len(pool)} unlabeled images come from "
            f"{pool.group_count()} group(s), and data.val_fraction={config.val_fraction} holds out 1 of {folds} "
            f"group folds. Fix: add images from more groups, {_FEWER_FOLDS}use a finer data.group_by, or leave it out"
        )
    ssl_train, val = _hold_out(pool, config.val_fraction, "val", notes)
    return DatasetSplits(name, ssl_train, None, val, None, 0, skipped, notes)


def _embedded_splits(config: DataConfig) -> DatasetSplits:
    """The embedded labeled sets (digits, MNIST-5k): every image is SSL-train, val or test; eval-train is SSL-train."""
    notes: list[str] = []
    ssl_train, val, test = _val_test(EMBEDDED_POOLS[config.source](config.image_size), config, notes)
    eval_train = _labeled_part(ssl_train, config.labeled_fraction, notes)
    return DatasetSplits(config.source, ssl_train, eval_train, val, test, 10, [], notes)


def _labeled_path_sets(
    config: DataConfig, skipped: list[str], notes: list[str], group_by: Optional[GroupBy] = None
) -> tuple[ImageSet, ImageSet, ImageSet, int]:
    """(eval pool, val set, test set, class count) from ``data.labeled_path``."""
    labeled_path = _expand(config.labeled_path or "")
    labeled_records = _any_records(labeled_path, "data.labeled_path", group_by)
    if not labeled_records.num_classes:
        raise _needs_labels(str(labeled_path))
    _require_classes(labeled_records.num_classes, str(labeled_path))
    pool = _decode_records(labeled_records, config.image_size, skipped)
    eval_pool, val, test = _val_test(pool, config, notes, labeled_records.class_names)
    return eval_pool, val, test, labeled_records.num_classes


def _file_splits(config: DataConfig) -> DatasetSplits:
    if not config.path:
        raise DataError(f"data.source={config.source!r} needs data.path (a folder or parquet file)")
    path = _expand(config.path)
    skipped: list[str] = []
    notes: list[str] = []
    if config.streaming:  # the SSL-train images reach the workers through Ray Data (ssl_train.data.streaming)
        eval_pool, val, test, num_classes = _labeled_path_sets(config, skipped, notes)
        eval_train = _labeled_part(eval_pool, config.labeled_fraction, notes)
        return DatasetSplits(str(path), None, eval_train, val, test, num_classes, skipped, notes)
    group_by = _group_by(config)
    if config.source == "parquet":
        records = _parquet_records(path, "data.path", group_by)
    else:
        records = _folder_records(_local_folder(path, "data.path"), "data.path", group_by)
    main = _decode_records(records, config.image_size, skipped)
    if config.labeled_path:
        eval_pool, val, test, num_classes = _labeled_path_sets(config, skipped, notes, group_by)
        ssl_train = _without_groups_of(main, [val, test], notes)
    elif records.num_classes:
        _require_classes(records.num_classes, str(path))
        ssl_train, val, test = _val_test(main, config, notes, records.class_names)
        eval_pool, num_classes = ssl_train, records.num_classes
    else:  # no labels anywhere: a val sample for RankMe, no accuracy
        return _unlabeled_splits(str(path), main, config, skipped, notes)
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
    so every trial and every confirmation seed is measured on the same val and test images. With
    ``data.group_by`` they are made by group. With ``data.leak_check``, the val and test images with a near-copy
    among the training images are counted (``DatasetSplits.leaks``).
    """
    if config.source in EMBEDDED_POOLS:
        splits = _embedded_splits(config)
    elif config.source in ("cifar10", "stl10"):
        splits = _torchvision_splits(config)
    else:
        splits = _file_splits(config)
    if config.leak_check and splits.ssl_train is not None:
        apart = splits.eval_train is not None and splits.eval_train is not splits.ssl_train
        training = [splits.ssl_train] + ([splits.eval_train] if apart else [])
        reference = torch.cat([part.images for part in training])
        test = splits.test.images if splits.test is not None else splits.val.images[:0]
        splits.leaks = check_leaks(splits.val.images, test, reference, group_by=config.group_by)
    return splits
