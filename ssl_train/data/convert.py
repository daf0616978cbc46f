"""Conversion: image folders, image sets and the digits default written as Parquet."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchvision.transforms.v2.functional as TF

from ssl_train.config import DataConfig
from ssl_train.data.sets import DataError, ImageSet
from ssl_train.data.sources import _digits_pool, _folder_listing
from ssl_train.data.splits import _embedded_splits

logger = logging.getLogger("ssl_train.data")

_ROWS_PER_GROUP = 256
DIGITS_FILES = ("unlabeled.parquet", "labeled.parquet")  # what digits_to_parquet writes into its folder


def folder_to_parquet(src: str | Path, dst: str | Path) -> int:
    """Write an image folder (class sub-folders or flat) as one parquet file; returns rows written.

    Columns: ``image`` (the original file bytes), ``label`` (int64 class index in sorted class
    order, null for a flat folder), ``path`` (relative to ``src``). Files are copied as they are;
    unreadable images are skipped when the parquet file is loaded, as for the folder.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.is_dir():
        raise DataError(f"destination '{dst}' is a folder; give a file path such as '{dst / 'images.parquet'}'")
    files, labels, _ = _folder_listing(src, "source folder")
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("path", pa.string())])
    dst.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(dst, schema) as writer:
        for start in range(0, len(files), _ROWS_PER_GROUP):
            chunk = files[start : start + _ROWS_PER_GROUP]
            writer.write_table(pa.table({
                "image": [_read_bytes(p) for p in chunk],
                "label": [int(label) if label >= 0 else None for label in labels[start : start + _ROWS_PER_GROUP]],
                "path": [p.relative_to(src).as_posix() for p in chunk],
            }, schema=schema))
    return len(files)


def _read_bytes(path: Path) -> Optional[bytes]:
    """The file's bytes; None (an empty cell, skipped on load) when the file cannot be read."""
    try:
        return path.read_bytes()
    except OSError as error:
        logger.warning("cannot read '%s' (%s); writing an empty image cell", path, error)
        return None


def images_to_parquet(images: ImageSet, dst: str | Path) -> Path:
    """Write decoded images as one parquet file of PNGs (``label`` null where -1; a ``group`` column when the
    images have groups, for ``data.group_by=column:group``); returns ``dst``.

    PNG is lossless and ``decode_image`` leaves an image of the target size untouched, so loading
    the file at the same ``image_size`` gives back exactly these pixels.
    """
    dst = Path(dst).expanduser()
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64())]
                       + ([("group", pa.string())] if images.groups is not None else []))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(dst, schema) as writer:
        for start in range(0, len(images), _ROWS_PER_GROUP):
            chunk = images.select(np.arange(start, min(start + _ROWS_PER_GROUP, len(images))))
            columns = {
                "image": [_png_bytes(image) for image in chunk.images],
                "label": [int(label) if label >= 0 else None for label in chunk.labels.tolist()],
            }
            if chunk.groups is not None:
                columns["group"] = chunk.groups.tolist()
            writer.write_table(pa.table(columns, schema=schema))
    return dst


def _png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    TF.to_pil_image(image).save(buffer, format="PNG")
    return buffer.getvalue()


def digits_to_parquet(dst_dir: str | Path, image_size: int = DataConfig.image_size) -> tuple[Path, Path]:
    """The digits default in Parquet form: ``unlabeled.parquet`` (its SSL-train images) and ``labeled.parquet``.

    With ``data.source=parquet``, ``data.path`` the first and ``data.labeled_path`` the second, the
    SSL-train, eval and test sets are exactly those of ``data.source=digits`` (same pixels, same order,
    same splits, given the same ``image_size`` and the default fractions), streamed or not: a way to try
    ``data.streaming`` on the default data.
    """
    dst_dir = Path(dst_dir).expanduser()
    pool = _digits_pool(image_size)
    ssl_train = _embedded_splits(DataConfig(image_size=image_size)).ssl_train
    unlabeled = ImageSet(ssl_train.images, torch.full((len(ssl_train),), -1, dtype=torch.long))
    return (images_to_parquet(unlabeled, dst_dir / DIGITS_FILES[0]),
            images_to_parquet(pool, dst_dir / DIGITS_FILES[1]))
