"""Ray Data streaming of a parquet ``data.path`` to the train workers (``data.streaming=true``).

Ray Data tasks read the parquet row groups and decode them wherever the cluster has CPUs; each
worker receives a disjoint share of the rows (``ray.train.get_dataset_shard``) and keeps only
that share. :class:`ssl_train.data.sharding.ShardedImages` then exchanges, each epoch, the images of
every worker's batch slices, so the run follows the same global batches as the in-memory path.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray.data
import ray.train

from ssl_train.config import DataConfig
from ssl_train.data.decode import _decode_all
from ssl_train.data.sets import DataError
from ssl_train.data.sources import _expand, _filesystem, _parquet_columns, _parquet_files_or_error, _row_names

SSL_DATASET = "ssl_train"
STREAMING_CPUS = 1.0  # a decode task's CPU (Ray Data's default), on top of the train workers' CPUs


def _decode_piece(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    return decode_row_group({key: value[0] for key, value in batch.items()}, image_size)


def ssl_dataset(data: DataConfig) -> ray.data.Dataset:
    """The SSL-train rows of ``data.path`` as a lazy Ray Dataset: one read-and-decode task per row group."""
    pieces = parquet_row_groups(data.path or "")
    # Epoch lines are the progress users read; Ray Data's own bars and 10 s progress logs would bury them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray.data.from_items(pieces, override_num_blocks=len(pieces)).map_batches(
        partial(_decode_piece, image_size=data.image_size), batch_size=1, batch_format="numpy"
    )


def streamed_rows(source: ray.data.Dataset | ray.data.DataIterator) -> Iterable[dict[str, np.ndarray]]:
    """The decoded rows of a dataset (in-process run) or of a worker's shard, block by block."""
    return source.iter_batches(batch_size=None, batch_format="numpy")


class EveryRowOnce(ray.train.DataConfig):
    """Split the streamed dataset over the workers without dropping rows.

    Ray Train's default split asks for equal shares and drops the rows that do not divide; here
    each row goes to exactly one worker, in shares of any size (the exchange evens them out).
    """

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any,
                  worker_node_ids: Any, **kwargs: Any) -> list[dict[str, Any]]:
        shards: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            for rank, shard in enumerate(dataset.streaming_split(world_size, equal=False,
                                                                 locality_hints=worker_node_ids)):
                shards[rank][name] = shard
        return shards


# ---------------------------------------------------------------- the pieces Ray Data tasks run


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
