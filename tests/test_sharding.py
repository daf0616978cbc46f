"""Global batches split over workers: every sample once per epoch, same optimisation at any worker count."""

import pytest
import torch

from ssl_train.data.sharding import GlobalBatchSampler, local_batch_sizes, loss_weight


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_an_epoch_visits_every_sample_exactly_once(world_size):
    samplers = [GlobalBatchSampler(120, 40, rank, world_size, seed=7) for rank in range(world_size)]
    seen = [i for sampler in samplers for batch in sampler for i in batch]
    assert sorted(seen) == list(range(120))


def test_global_batches_do_not_depend_on_worker_count():
    one = list(GlobalBatchSampler(100, 30, 0, 1, seed=3))
    for world_size in (2, 3, 4):
        parts = [list(GlobalBatchSampler(100, 30, r, world_size, seed=3)) for r in range(world_size)]
        joined = [sum((p[step] for p in parts), []) for step in range(len(one))]
        assert joined == one
    assert len(one) == 3  # 100 // 30, the incomplete batch is dropped


def test_epochs_reshuffle_deterministically():
    sampler = GlobalBatchSampler(50, 10, 0, 1, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first != second


def test_uneven_split_and_loss_weights_give_the_global_mean_gradient():
    assert local_batch_sizes(10, 3) == [4, 3, 3]
    # DDP averages worker gradients; weighted worker means must average to the global mean.
    values = torch.arange(10, dtype=torch.float64)
    chunks = torch.split(values, local_batch_sizes(10, 3))
    ddp_mean = sum(loss_weight(10, 3, r) * chunk.mean() for r, chunk in enumerate(chunks)) / 3
    assert ddp_mean.item() == pytest.approx(values.mean().item())
    assert loss_weight(8, 2, 0) == 1.0


def test_batch_larger_than_data_is_an_error():
    with pytest.raises(ValueError, match="exceeds"):
        GlobalBatchSampler(10, 20, 0, 1, seed=0)
