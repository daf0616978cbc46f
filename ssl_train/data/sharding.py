"""Global batches split over workers, so the optimisation does not depend on the worker count.

Each epoch draws one permutation of the SSL training set (seeded by run seed and epoch)
and cuts it into global batches of ``optim.batch_size`` (the last incomplete batch is
dropped, as the papers' code does). Worker ``r`` of ``W`` takes its slice of every global
batch. When ``W`` does not divide the batch, the first ``batch % W`` workers take one
sample more, and :func:`loss_weight` rescales each worker's mean loss so that DDP's
gradient average equals the gradient of the global-batch mean. So 1, 2 or 3 workers follow
the same sequence of global batches and the same update (up to BatchNorm statistics,
which ``scaling.sync_batchnorm`` makes global too).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


def local_batch_sizes(global_batch: int, world_size: int) -> list[int]:
    """Per-worker batch sizes that add up to ``global_batch``."""
    base, extra = divmod(global_batch, world_size)
    return [base + (1 if rank < extra else 0) for rank in range(world_size)]


def loss_weight(global_batch: int, world_size: int, rank: int) -> float:
    """Factor on worker ``rank``'s mean loss so the DDP mean gradient is the global mean.

    DDP averages gradients: (1/W) sum_r w_r grad(mean_r). With w_r = W * b_r / B this is
    sum_r (b_r / B) grad(mean_r) = grad of the mean over all B samples.
    """
    return world_size * local_batch_sizes(global_batch, world_size)[rank] / global_batch


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this worker's indices of each global batch of one epoch."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int) -> None:
        if global_batch > num_samples:
            raise ValueError(f"global batch {global_batch} exceeds the {num_samples} training samples")
        sizes = local_batch_sizes(global_batch, world_size)
        if min(sizes) < 1:
            raise ValueError(f"global batch {global_batch} cannot feed {world_size} workers")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.start = sum(sizes[:rank])
        self.stop = self.start + sizes[rank]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        for step in range(len(self)):
            batch = order[step * self.global_batch : (step + 1) * self.global_batch]
            yield batch[self.start : self.stop]


def _epoch_positions(sampler: GlobalBatchSampler, epoch: int) -> np.ndarray:
    sampler.set_epoch(epoch)
    return np.fromiter((i for batch in sampler for i in batch), dtype=np.int64)


class ShardedImages:
    """The SSL-train set spread over the workers: each holds the rows Ray Data streamed to it.

    Positions ``0..N-1`` number the readable rows in file order, as the in-memory set numbers its
    images, so the same :class:`GlobalBatchSampler` applies. Each epoch one all-to-all exchange
    gives every worker exactly the images of its batch slices, in order: a streamed run trains on
    the same batches as one holding every image, while each worker keeps about N / W images.
    """

    def __init__(self, rows: np.ndarray, images: torch.Tensor, rank: int, world_size: int) -> None:
        order = np.argsort(rows)
        self.images = images[torch.as_tensor(order)]
        self.rank, self.world_size = rank, world_size
        held = [rows[order]] if world_size == 1 else _all_gather_arrays(rows[order], world_size)
        by_row = np.argsort(np.concatenate(held))  # positions follow the row numbers (the file order)
        # For each position: the worker holding its image, and the image's index there.
        self.owner = np.concatenate([np.full(len(part), r, dtype=np.int64) for r, part in enumerate(held)])[by_row]
        self.local = np.concatenate([np.arange(len(part)) for part in held])[by_row]

    @classmethod
    def from_batches(
        cls, batches: Iterable[dict[str, np.ndarray]], image_size: int, rank: int, world_size: int
    ) -> ShardedImages:
        """Collect this worker's streamed rows (``index``, ``image``, ``error``: see ``streaming.decode_row_group``)."""
        rows = [np.zeros(0, np.int64)]
        images = [torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)]
        errors: list[str] = []
        for batch in batches:
            ok = batch["error"] == ""
            rows.append(batch["index"][ok])
            images.append(torch.from_numpy(np.ascontiguousarray(batch["image"][ok])))
            errors += list(batch["error"][~ok])
        if errors:
            logger.warning("skipped %d unreadable streamed images, e.g. %s", len(errors), errors[0])
        return cls(np.concatenate(rows), torch.cat(images), rank, world_size)

    def __len__(self) -> int:
        return len(self.owner)

    def epoch_images(self, epoch: int, global_batch: int, seed: int) -> torch.Tensor:
        """This worker's images of ``epoch``, in the order of its ``GlobalBatchSampler`` slices."""
        needs = [
            _epoch_positions(GlobalBatchSampler(len(self), global_batch, r, self.world_size, seed), epoch)
            for r in range(self.world_size)
        ]
        if self.world_size == 1:
            return self.images[torch.as_tensor(self.local[needs[0]])]
        sends = [positions[self.owner[positions] == self.rank] for positions in needs]
        outgoing = self.images[torch.as_tensor(self.local[np.concatenate(sends)])]
        sources = self.owner[needs[self.rank]]
        incoming = torch.empty((len(sources), *self.images.shape[1:]), dtype=torch.uint8)
        _all_to_all(incoming, outgoing, [int((sources == r).sum()) for r in range(self.world_size)],
                    [len(s) for s in sends])
        ordered = torch.empty_like(incoming)
        ordered[torch.as_tensor(np.argsort(sources, kind="stable"))] = incoming  # grouped by sender -> slice order
        return ordered


def _all_gather_arrays(array: np.ndarray, world_size: int) -> list[np.ndarray]:
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, array)
    return gathered


def _all_to_all(incoming: torch.Tensor, outgoing: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> None:
    """``dist.all_to_all_single`` of uint8 images; through the GPU when the process group is NCCL."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else incoming.device
    received = incoming.to(device)
    dist.all_to_all_single(received, outgoing.to(device), in_splits, out_splits)
    incoming.copy_(received)
