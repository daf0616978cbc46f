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

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


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
