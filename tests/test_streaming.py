"""Ray Data streaming of Parquet (data.streaming): the same images, batches and results as the in-memory path.

The digits default in Parquet form (``digits_to_parquet``) holds exactly the digits' pixels, so a
streamed run on it can be compared with the in-memory digits run, number for number.
"""

import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import parquet_overrides
from test_loop import TINY

from ssl_train.config import ConfigError, load_config
from ssl_train.data import load_splits
from ssl_train.data.sharding import GlobalBatchSampler, ShardedImages
from ssl_train.data.streaming import decode_row_group, parquet_row_groups, ssl_dataset, streamed_rows
from ssl_train.training.distributed import check_capacity
from ssl_train.training.loop import train_loop
from tuning.cli import main

RUN = [*TINY, "optim.epochs=2", "optim.warmup_epochs=0"]



def test_the_parquet_form_of_digits_holds_the_same_images_and_splits(digits_parquet):
    digits = load_splits(load_config(overrides=TINY).data)
    parquet = load_splits(load_config(overrides=[*TINY, *parquet_overrides(digits_parquet, False)]).data)
    for part in ("ssl_train", "eval_train", "test"):
        assert torch.equal(getattr(digits, part).images, getattr(parquet, part).images), part
    assert torch.equal(digits.test.labels, parquet.test.labels) and parquet.num_classes == 10


def test_streamed_row_groups_number_rows_as_the_in_memory_set(digits_parquet):
    pieces = parquet_row_groups(digits_parquet[0])
    assert len(pieces) == 4 and [p["first_row"] for p in pieces] == [0, 256, 512, 768]  # 1005 rows
    decoded = [decode_row_group(piece, image_size=8) for piece in reversed(pieces)]
    rows = np.concatenate([d["index"] for d in decoded])
    images = torch.from_numpy(np.concatenate([d["image"] for d in decoded]))
    in_memory = load_splits(load_config(overrides=TINY).data).ssl_train.images
    assert sorted(rows.tolist()) == list(range(len(in_memory)))
    assert torch.equal(images[torch.as_tensor(np.argsort(rows))], in_memory)
    assert all((d["error"] == "").all() for d in decoded)


def test_streaming_needs_parquet_and_labeled_images():
    with pytest.raises(ConfigError, match=r"data.source='digits' is invalid; data.streaming=true streams parquet"):
        load_config(overrides=["data.streaming=true"])
    with pytest.raises(ConfigError, match=r"data.labeled_path=None is invalid; .*set data.labeled_path"):
        load_config(overrides=["data.streaming=true", "data.source=parquet", "data.path=x.parquet"])


def test_capacity_counts_a_cpu_for_the_decode_tasks(ray_cluster, digits_parquet):
    config = load_config(overrides=[*TINY, *parquet_overrides(digits_parquet, True),
                                    "scaling.min_workers=2", "scaling.max_workers=2"])
    decode_cpu = r"x scaling.cpus_per_worker=1 \+ 1 for Ray Data's decode tasks .* need 3 CPU"
    with pytest.raises(ConfigError, match=decode_cpu):
        check_capacity(config, may_grow=False)  # the session cluster has 2 CPUs
    check_capacity(config.replace({"scaling.cpus_per_worker": 0.5}), may_grow=False)


def _exchange(rank: int, world_size: int, port: int, rows: list, images: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    sharded = ShardedImages(np.asarray(rows[rank]), images[torch.as_tensor(rows[rank])], rank, world_size)
    out[rank] = [sharded.epoch_images(epoch, 10, seed=5) for epoch in (0, 1)]
    dist.destroy_process_group()


def test_sharded_images_give_each_worker_exactly_its_batch_slices(free_port):
    """Rows spread unevenly and out of order over 2 workers; each epoch every worker gets its slices, in order."""
    images = torch.arange(43, dtype=torch.uint8).view(43, 1, 1, 1).expand(43, 3, 2, 2).contiguous()
    order = np.random.default_rng(0).permutation(43)
    rows = [order[:30].tolist(), order[30:].tolist()]  # shares of 30 and 13 rows
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_exchange, args=(2, free_port, rows, images, out), nprocs=2)
        received = dict(out)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            sampler = GlobalBatchSampler(43, 10, rank, 2, seed=5)
            sampler.set_epoch(epoch)
            expected = [i for batch in sampler for i in batch]
            assert torch.equal(received[rank][epoch], images[expected])  # the in-memory path's images, in order
            seen += expected
        assert len(seen) == len(set(seen)) == 40  # 4 global batches of 10: each image at most once, 3 left out
    assert not torch.equal(received[0][0], received[0][1])  # epochs reshuffle


def _history(overrides: list[str], stream: bool) -> list[tuple[float, float]]:
    """(loss, kNN accuracy) per epoch of an in-process run, its rows streamed by Ray Data or not."""
    config = load_config(overrides=overrides)
    seen = []
    streamed = streamed_rows(ssl_dataset(config.data)) if stream else None
    train_loop(config, lambda metrics, _: seen.append(metrics), streamed=streamed)
    return [(m["loss"], m["val_knn_acc"]) for m in seen]


def test_a_streamed_run_equals_the_in_memory_digits_run(ray_cluster, digits_parquet):
    # Each run in a 1-CPU Ray task (the same thread count for all three; Ray Data's executor stays out of
    # the test process, where it would outlive the test), Ray Data's decode tasks on the other CPU.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    history = ray.remote(num_cpus=1)(_history)
    streaming = [*RUN, *parquet_overrides(digits_parquet, True)]
    in_memory, streamed, fallback = ray.get([history.remote(RUN, False), history.remote(streaming, True),
                                             history.remote(streaming, False)])
    assert len(in_memory) == 2 and in_memory[0] != in_memory[1]
    # Ray Data -> one worker's share (all rows) -> the epoch's images: the same numbers, bit for bit.
    assert streamed == in_memory
    # With no stream (one worker in its own process) the same rows are read into memory: the same numbers again.
    assert fallback == in_memory


def test_cli_writes_the_digits_parquet_form(tmp_path, capsys):
    assert main(["data", "to-parquet", "digits", str(tmp_path / "digits"), "--image-size", "8"]) == 0
    unlabeled, labeled = tmp_path / "digits" / "unlabeled.parquet", tmp_path / "digits" / "labeled.parquet"
    assert pq.read_metadata(unlabeled).num_rows == 1005 and pq.read_metadata(labeled).num_rows == 1797
    assert pq.read_table(unlabeled, columns=["label"]).column("label").null_count == 1005  # SSL images: no labels
    printed = capsys.readouterr().out
    assert f"--set data.path={unlabeled}" in printed and f"--set data.labeled_path={labeled}" in printed
