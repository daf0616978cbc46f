"""Datasets: images decoded once into uint8 tensors, split into SSL-train / eval-train / test.

Sources (``DataConfig.source``):

- ``digits``: scikit-learn's 1,797 labeled 8x8 digits (ships with the dependency, no download).
- ``folder``: class sub-folders ``path/<class>/*.png`` (labeled), or a flat folder of unlabeled
  images plus ``labeled_path`` (class sub-folders or parquet) for evaluation.
- ``parquet``: a file or a folder of ``.parquet`` files, columns ``image`` (encoded bytes) and
  optional ``label`` (integer; null = unlabeled). ``folder_to_parquet`` writes this format.
- ``cifar10`` / ``stl10``: torchvision datasets under ``download_root`` (downloaded when missing).

Labeled data is split with a fixed seed (``SPLIT_SEED``), stratified by class, so every run and
every trial of a sweep measures on the same test images. Unreadable images are skipped and listed
in ``DatasetSplits.skipped``; they never stop a run.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ssl_train import uris
from ssl_train.config import DataConfig

logger = logging.getLogger(__name__)

# The split seed is a constant, not the run's seed: all trials compare on the same images.
SPLIT_SEED = 20201
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Largest image accepted (16384 x 16384). JPEGs are decoded at 1/2..1/8 scale via draft(), so
# even this size costs little memory; PIL's own decompression-bomb limit is raised to match.
MAX_PIXELS = 16384 * 16384
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError, tarfile.TarError, http.client.HTTPException)
_ROWS_PER_GROUP = 256
_RESIZE_CHUNK = 4096

ImageSource = Union[bytes, str, Path]


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


# ---------------------------------------------------------------- decoding one image


def _allow_large_images() -> None:
    """Raise PIL's decompression-bomb limit to MAX_PIXELS (idempotent, so thread-safe in effect)."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _describe(source: ImageSource) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else f"'{source}'"


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any PIL mode -> L, RGB, or RGBA (when the image has transparency)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grey (Pillow also opens some 16-bit files as 32-bit "I"): scale 0..65535 -> 0..255.
        values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")
    if img.has_transparency_data:
        return img.convert("RGBA")
    return img if img.mode in ("L", "RGB") else img.convert("RGB")


def decode_image(source: ImageSource, image_size: int) -> torch.Tensor:
    """Encoded image (bytes or a file path) -> uint8 ``[3, S, S]`` RGB.

    The shorter side is resized to S and the centre cropped (one resize of the centre square).
    JPEGs are decoded at reduced scale first; transparency is composited on white; 16-bit images
    are scaled, not clipped, to 8 bits. Raises DataError when the input is not a readable image.
    """
    _allow_large_images()
    where = _describe(source)
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with Image.open(stream) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise DataError(
                    f"image {where} is {width}x{height} = {width * height} pixels, over the limit of {MAX_PIXELS}; "
                    "downscale it before training"
                )
            short = min(width, height)
            img.draft(None, (-(-width * image_size // short), -(-height * image_size // short)))
            ImageOps.exif_transpose(img, in_place=True)
            img = _to_8bit(img)
            width, height = img.size
            short = min(width, height)
            left, top = (width - short) // 2, (height - short) // 2
            fitted = img.resize(
                (image_size, image_size), Image.Resampling.BICUBIC,
                box=(left, top, left + short, top + short), reducing_gap=3.0,
            )
    except DataError:
        raise
    except _DECODE_ERRORS as error:
        raise DataError(f"cannot decode image {where}: {error}") from error
    if fitted.mode == "RGBA":
        fitted = Image.alpha_composite(Image.new("RGBA", fitted.size, "white"), fitted)
    return TF.pil_to_tensor(fitted.convert("RGB"))


# ---------------------------------------------------------------- undecoded records


@dataclass
class _Records:
    """Images not yet decoded: file paths or bytes (None: an empty parquet cell), labels (-1 = none)."""

    sources: list[Optional[ImageSource]]
    names: list[str]
    labels: np.ndarray
    num_classes: int
    where: str


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _folder_listing(path: Path, key: str) -> tuple[list[Path], np.ndarray, int]:
    """Image files, labels (-1 = none) and class count of class sub-folders (classes in sorted order,
    files sorted) or of a flat folder (unlabeled)."""
    if not path.exists():
        raise DataError(f"{key}='{path}' does not exist; give a folder of images")
    if not path.is_dir():
        raise DataError(f"{key}='{path}' is a file, not a folder; for a parquet file use data.source=parquet")
    top = sorted(p for p in path.iterdir() if _is_image_file(p))
    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = {d.name: sorted(p for p in d.rglob("*") if _is_image_file(p)) for d in class_dirs}
    classes = {name: files for name, files in classes.items() if files}
    if top and classes:
        raise DataError(
            f"{key}='{path}' holds both images ({len(top)}) and class sub-folders ({sorted(classes)[:5]}); "
            "use class sub-folders only (labeled), or a flat folder of unlabeled images plus data.labeled_path"
        )
    if not top and not classes:
        raise DataError(
            f"{key}='{path}' has no images (extensions {', '.join(IMAGE_EXTENSIONS)}) in it or its sub-folders"
        )
    if top:
        return top, np.full(len(top), -1, np.int64), 0
    files = [p for class_files in classes.values() for p in class_files]
    labels = np.concatenate([np.full(len(class_files), k, np.int64) for k, class_files in enumerate(classes.values())])
    return files, labels, len(classes)


def _folder_records(path: Path, key: str) -> _Records:
    files, labels, num_classes = _folder_listing(path, key)
    return _Records(list(files), [str(p) for p in files], labels, num_classes, str(path))


def _parquet_files(location: str, key: str) -> tuple[list[str], bool]:
    """The parquet files at ``location`` (a file, or a folder's ``*.parquet``; a path or URI) and whether
    ``location`` exists at all."""
    fs, path = _filesystem(location, key)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [location], True
    if info.type != pafs.FileType.Directory:
        return [], False
    entries = fs.get_file_info(pafs.FileSelector(path))
    return sorted(uris.child(location, e.path) for e in entries if e.is_file and e.path.endswith(".parquet")), True


def _parquet_files_or_error(location: str, key: str) -> list[str]:
    files, exists = _parquet_files(location, key)
    if not files:
        raise DataError(
            f"{key}='{location}' " + ("does not exist" if not exists else "holds no .parquet files")
            + "; give a parquet file or a folder of them (for an image folder use data.source=folder)"
        )
    return files


def _filesystem(location: str, key: str) -> tuple[pafs.FileSystem, str]:
    try:
        return uris.filesystem(location, key)
    except uris.LocationError as error:
        raise DataError(str(error)) from None


def _local_folder(location: str, key: str) -> Path:
    """An image folder is read from local disk; a remote one gets a message with the fix."""
    fs, path = _filesystem(location, key)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise DataError(f"{key}='{location}': image folders are read from local disk; convert the folder with "
                        "`ssl-tune data to-parquet` and give the Parquet file's URI (data.source=parquet)")
    return Path(path)


def _binary_type(dtype: pa.DataType) -> bool:
    view = getattr(pa.types, "is_binary_view", lambda _: False)
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or view(dtype)


def _parquet_columns(file: str) -> list[str]:
    """The columns of ``file`` this module reads (``image``, then ``label`` and ``path`` when present), checked."""
    fs, path = _filesystem(file, "data.path")
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"'{file}' is not a readable parquet file: {error}") from error
    if "image" not in schema.names:
        raise DataError(
            f"'{file}' has no 'image' column (columns: {schema.names}); expected 'image' (binary: encoded "
            "PNG/JPEG bytes) and optionally 'label' (integer); folder_to_parquet / `ssl-tune data to-parquet` writes it"
        )
    if not _binary_type(schema.field("image").type):
        raise DataError(
            f"'{file}': column 'image' has type {schema.field('image').type}; expected binary "
            "(the encoded image file's bytes)"
        )
    label_type = schema.field("label").type if "label" in schema.names else pa.null()
    if not (pa.types.is_integer(label_type) or pa.types.is_null(label_type)):
        raise DataError(
            f"'{file}': column 'label' has type {label_type}; expected an integer type "
            "(int64, null for unlabeled rows)"
        )
    return ["image"] + [name for name in ("label", "path") if name in schema.names]


def _row_names(file: str, table: pa.Table, first_row: int = 0) -> list[str]:
    """How skipped rows are named: the ``path`` column when there is one, else the row number."""
    if "path" in table.column_names:
        return [f"{file}:{p}" for p in table.column("path").to_pylist()]
    return [f"{file}:row {first_row + i}" for i in range(table.num_rows)]


def _read_parquet_file(file: str) -> tuple[list[Optional[bytes]], list[str], np.ndarray]:
    columns = _parquet_columns(file)
    has_label = "label" in columns
    fs, path = _filesystem(file, "data.path")
    table = pq.read_table(path, columns=columns, filesystem=fs)
    rows = table.num_rows
    names = _row_names(file, table)
    labels = (
        pc.fill_null(table.column("label").cast(pa.int64()), -1).to_numpy() if has_label
        else np.full(rows, -1, np.int64)
    )
    negative = np.flatnonzero(labels < -1)  # null reads as -1; an explicit -1 means "unlabeled" too
    if negative.size:
        raise DataError(
            f"'{file}': column 'label' has negative value {labels[negative[0]]} (row {negative[0]}); "
            "labels must be >= 0 (null or -1 for unlabeled rows)"
        )
    return table.column("image").to_pylist(), names, labels.astype(np.int64)


def _parquet_records(path: str, key: str) -> _Records:
    """All rows of the parquet file(s) at ``path`` (a path or URI); labels renumbered 0..C-1 in sorted order."""
    files = _parquet_files_or_error(path, key)
    sources: list[Optional[ImageSource]] = []
    names: list[str] = []
    labels: list[np.ndarray] = []
    for file in files:
        images, file_names, file_labels = _read_parquet_file(file)
        sources += images
        names += file_names
        labels.append(file_labels)
    raw = np.concatenate(labels)
    if not len(raw):
        raise DataError(f"{key}='{path}' has no rows; it holds no images")
    labeled = raw >= 0
    if labeled.all():
        classes, index = np.unique(raw, return_inverse=True)
        return _Records(sources, names, index.astype(np.int64), len(classes), str(path))
    if labeled.any():
        raise DataError(
            f"{key}='{path}': {int(labeled.sum())} of {len(raw)} rows have a label; give every row a label "
            "or none (put the labeled images in data.labeled_path)"
        )
    return _Records(sources, names, raw, 0, str(path))


def _any_records(path: str, key: str) -> _Records:
    """A parquet file, a folder of parquet files, or an image folder."""
    if _parquet_files(path, key)[0]:
        return _parquet_records(path, key)
    return _folder_records(_local_folder(path, key), key)


def _try_decode(source: Optional[ImageSource], image_size: int) -> Union[torch.Tensor, str]:
    if source is None:
        return "empty image cell"
    try:
        return decode_image(source, image_size)
    except DataError as error:
        return str(error)


def _decode_all(sources: Sequence[Optional[ImageSource]], image_size: int) -> Iterator[Union[torch.Tensor, str]]:
    """Each source decoded, or why it could not be, in order (threads: PIL releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        yield from pool.map(partial(_try_decode, image_size=image_size), sources)


def _decode_records(records: _Records, image_size: int, skipped: list[str]) -> ImageSet:
    """Decode every record; unreadable ones go to ``skipped``."""
    out = torch.empty((len(records.sources), 3, image_size, image_size), dtype=torch.uint8)
    kept: list[int] = []
    reasons: list[str] = []
    for i, result in enumerate(_decode_all(records.sources, image_size)):
        if isinstance(result, str):
            skipped.append(records.names[i])
            reasons.append(f"{records.names[i]}: {result}")
        else:
            out[len(kept)] = result
            kept.append(i)
    if not kept:
        raise DataError(
            f"none of the {len(records.sources)} images under '{records.where}' could be decoded "
            f"(e.g. {reasons[0]}); check the files are images"
        )
    if reasons:
        logger.warning("skipped %d unreadable images under '%s', e.g. %s", len(reasons), records.where, reasons[0])
    images = out[: len(kept)].clone() if len(kept) < len(out) else out
    return ImageSet(images, torch.as_tensor(records.labels[kept], dtype=torch.long))


# ---------------------------------------------------------------- splitting


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


# ---------------------------------------------------------------- sources


def _expand(location: str) -> str:
    """``~`` expanded in a local path; a URI as it is."""
    return location if uris.is_uri(location) else str(Path(location).expanduser())


def _resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[N, 3, h, h]`` -> ``[N, 3, size, size]`` (bilinear, antialiased), in chunks."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK]
        out[start : start + len(chunk)] = TF.resize(chunk, [size, size], antialias=True)
    return out


def _digits_pool(image_size: int) -> ImageSet:
    """All 1,797 labeled digits as ``image_size`` RGB images, in scikit-learn's order."""
    digits = load_digits()
    grey = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return ImageSet(_resize_square(grey.repeat(1, 3, 1, 1), image_size), labels)


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


def _torchvision_dataset(factory: Callable[..., Any], name: str, root: Path, **kwargs: Any) -> Any:
    """The dataset from ``root``; downloaded there when missing (needs network)."""
    try:
        return factory(str(root), download=False, **kwargs)
    except RuntimeError:
        pass  # not there yet: download it
    try:
        return factory(str(root), download=True, **kwargs)
    except _DOWNLOAD_ERRORS as error:
        raise DataError(
            f"{name} is not in data.download_root='{root}' and could not be downloaded ({error}). "
            f"With network access it downloads itself there on first use; otherwise download {name} "
            f"(torchvision.datasets format) into '{root}' on a machine with network, or set data.download_root "
            "to where it already is"
        ) from error


def _array_set(images: np.ndarray, labels: Sequence[int] | np.ndarray, size: int, channels_last: bool) -> ImageSet:
    tensor = torch.from_numpy(images)
    if channels_last:
        tensor = tensor.permute(0, 3, 1, 2)
    return ImageSet(_resize_square(tensor.contiguous(), size), torch.as_tensor(np.asarray(labels), dtype=torch.long))


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


# ---------------------------------------------------------------- conversion


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
    """Write decoded images as one parquet file of PNGs (``label`` null where -1); returns ``dst``.

    PNG is lossless and ``decode_image`` leaves an image of the target size untouched, so loading
    the file at the same ``image_size`` gives back exactly these pixels.
    """
    dst = Path(dst).expanduser()
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64())])
    dst.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(dst, schema) as writer:
        for start in range(0, len(images), _ROWS_PER_GROUP):
            chunk = images.select(np.arange(start, min(start + _ROWS_PER_GROUP, len(images))))
            writer.write_table(pa.table({
                "image": [_png_bytes(image) for image in chunk.images],
                "label": [int(label) if label >= 0 else None for label in chunk.labels.tolist()],
            }, schema=schema))
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
    ssl_train = _digits_splits(DataConfig(image_size=image_size)).ssl_train
    unlabeled = ImageSet(ssl_train.images, torch.full((len(ssl_train),), -1, dtype=torch.long))
    return (images_to_parquet(unlabeled, dst_dir / "unlabeled.parquet"),
            images_to_parquet(pool, dst_dir / "labeled.parquet"))


# ---------------------------------------------------------------- streaming pieces (run by Ray Data tasks)


def parquet_row_groups(path: str | Path) -> list[dict[str, Any]]:
    """The row groups of the parquet file(s) at ``path`` (metadata only, nothing decoded).

    Each piece names its ``file``, ``row_group``, ``file_row`` (first row in the file) and
    ``first_row``: its first row's number over all files, in the in-memory order (files sorted,
    rows in file order), so row ``i`` streamed is row ``i`` loaded in memory.
    """
    pieces: list[dict[str, Any]] = []
    first_row = 0
    for file in _parquet_files_or_error(_expand(str(path)), "data.path"):
        _parquet_columns(file)
        fs, inner = _filesystem(file, "data.path")
        metadata = pq.ParquetFile(inner, filesystem=fs).metadata
        file_row = 0
        for group in range(metadata.num_row_groups):
            pieces.append({"file": str(file), "row_group": group, "file_row": file_row, "first_row": first_row})
            rows = metadata.row_group(group).num_rows
            file_row, first_row = file_row + rows, first_row + rows
    if not first_row:
        raise DataError(f"data.path='{path}' has no rows; it holds no images")
    return pieces


def decode_row_group(piece: dict[str, Any], image_size: int) -> dict[str, np.ndarray]:
    """One piece of :func:`parquet_row_groups` decoded: ``index`` (row numbers), ``image`` (uint8
    ``[n, 3, S, S]``, zeros where unreadable) and ``error`` ("" when decoded, else the row's name and why)."""
    file = piece["file"]
    columns = [column for column in _parquet_columns(file) if column != "label"]
    fs, inner = _filesystem(file, "data.path")
    table = pq.ParquetFile(inner, filesystem=fs).read_row_group(int(piece["row_group"]), columns=columns)
    names = _row_names(file, table, int(piece["file_row"]))
    images = np.zeros((table.num_rows, 3, image_size, image_size), dtype=np.uint8)
    errors = np.full(table.num_rows, "", dtype=object)
    for i, result in enumerate(_decode_all(table.column("image").to_pylist(), image_size)):
        if isinstance(result, str):
            errors[i] = f"{names[i]}: {result}"
        else:
            images[i] = result.numpy()
    first = int(piece["first_row"])
    return {"index": np.arange(first, first + table.num_rows, dtype=np.int64), "image": images, "error": errors}
