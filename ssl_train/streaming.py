"""Ray Data streaming of a parquet ``data.path`` to the train workers (``data.streaming=true``).

Ray Data tasks read the parquet row groups and decode them wherever the cluster has CPUs; each
worker receives a disjoint share of the rows (``ray.train.get_dataset_shard``) and keeps only
that share. :class:`ssl_train.sharding.ShardedImages` then exchanges, each epoch, the images of
every worker's batch slices, so the run follows the same global batches as the in-memory path.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import numpy as np
import ray.data
import ray.train

from ssl_train.config import DataConfig
from ssl_train.data import decode_row_group, parquet_row_groups

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
