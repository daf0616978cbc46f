"""Ray Train: 2 CPU workers follow one global optimisation; elastic resizes and killed workers resume from checkpoints.

Every test here runs on the session's real local Ray cluster (``ray_cluster``); the slow ones add and
remove nodes or kill a worker process, as a cluster would.
"""

import math
import os
import queue
import re
import signal
import sys
import threading
import time

import pytest
import ray
import torch
import torch.distributed as dist
from conftest import parquet_overrides
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.state import list_actors
from test_loop import TINY

from ssl_train.config import ConfigError, load_config
from ssl_train.data import load_splits
from ssl_train.data.sharding import GlobalBatchSampler, local_batch_sizes
from ssl_train.methods.swav import sinkhorn
from ssl_train.status import Status
from ssl_train.training.checkpoint import load_checkpoint
from ssl_train.training.distributed import check_capacity
from ssl_train.training.loop import WorkerContext, build_model, train_loop
from ssl_train.training.run import train
from tuning.cli import main

EPSILON, ITERATIONS = 0.05, 3
SAMPLES, GLOBAL_BATCH, EPOCH = 100, 10, 2
PROBE_OVERRIDES = [*TINY, "method=byol", "optim.epochs=2", "optim.batch_size=64"]


def _settings(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _scores() -> torch.Tensor:
    """A fixed score matrix z . C of 9 samples (split 5 + 4 over 2 workers) and 6 prototypes."""
    return torch.nn.functional.normalize(torch.randn(9, 6, generator=torch.Generator().manual_seed(3)), dim=1)


def _target_and_online(method: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    target = [*method.target_backbone.parameters(), *method.target_projector.parameters()]
    online = [*method.backbone.parameters(), *method.projector.parameters()]
    return torch.cat([p.detach().flatten() for p in target]), torch.cat([p.detach().flatten() for p in online])


# Half a CPU each: a streamed run needs a CPU free for Ray Data's decode tasks on the 2-CPU cluster.
TWO_WORKERS = [*TINY, "optim.epochs=3", "scaling.min_workers=2", "scaling.max_workers=2", "scaling.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, tmp_path_factory):
    """A 2-worker Ray Train run on the digits default: (summary, metrics as they arrived, run directory)."""
    tmp_path = tmp_path_factory.mktemp("two-workers")
    live = []
    return train(load_config(overrides=[*TWO_WORKERS, f"output_dir={tmp_path}"]), on_epoch=live.append), live, tmp_path


def test_two_worker_run_finishes_and_writes_outputs(two_worker_run):
    summary, live, tmp_path = two_worker_run
    assert summary.status == Status.FINISHED and summary.restarts == 0
    assert [m["epoch"] for m in summary.history] == [1, 2, 3] == [m["epoch"] for m in live]
    assert all(m["workers"] == 2 for m in summary.history)
    knn = [m["val_knn_acc"] for m in summary.history]
    assert all(math.isfinite(a) for a in knn) and knn[-1] > 0.5  # 10 classes: chance is 0.1
    assert summary.history[-1]["loss"] < summary.history[0]["loss"]
    assert summary.backbone_path == tmp_path / "backbone.pt" and summary.backbone_path.is_file()
    assert summary.checkpoint == tmp_path / "checkpoints" / "epoch_0003"
    assert load_checkpoint(summary.checkpoint)["world_size"] == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.fixture(scope="module")
def two_worker_probe(ray_cluster, tmp_path_factory):
    """Run one tiny function on 2 Ray Train workers; returns what each rank saw, in rank order."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test file
    scores = _scores()

    def probe(loop_config: dict) -> list:
        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        sizes = local_batch_sizes(len(loop_config["scores"]), world)
        start = sum(sizes[:rank])
        codes = sinkhorn(loop_config["scores"][start : start + sizes[rank]], EPSILON, ITERATIONS)
        sampler = GlobalBatchSampler(SAMPLES, GLOBAL_BATCH, rank, world, seed=7)
        sampler.set_epoch(EPOCH)
        config = load_config(overrides=loop_config["overrides"])
        result = train_loop(config, lambda metrics, checkpoint: None, WorkerContext(rank=rank, world_size=world))
        target, online = _target_and_online(result.method)
        # Ray Train returns no tensors: send numpy arrays.
        seen = {"codes": codes.numpy(), "batches": list(sampler), "target": target.numpy(), "online": online.numpy()}
        gathered = [None] * world
        dist.all_gather_object(gathered, seen)
        return gathered

    trainer = TorchTrainer(
        probe,
        train_loop_config={"scores": scores, "overrides": PROBE_OVERRIDES},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="probe", storage_path=str(tmp_path_factory.mktemp("probe"))),
    )
    return trainer.fit().return_value


def test_sinkhorn_codes_of_two_workers_equal_one_worker(two_worker_probe):
    scores = _scores()
    together = torch.cat([torch.tensor(seen["codes"]) for seen in two_worker_probe])
    alone = sinkhorn(scores, EPSILON, ITERATIONS)
    assert together.shape == alone.shape == (9, 6)
    assert torch.allclose(together, alone, atol=1e-5, rtol=0)
    # Without the all-reduce each half would get other codes: the check above can fail.
    half = sinkhorn(scores[:5], EPSILON, ITERATIONS)
    assert (half - alone[:5]).abs().max() > 1e-3


def test_an_epoch_over_two_workers_visits_every_sample_once(two_worker_probe):
    rank0, rank1 = (seen["batches"] for seen in two_worker_probe)
    single = GlobalBatchSampler(SAMPLES, GLOBAL_BATCH, 0, 1, seed=7)
    single.set_epoch(EPOCH)
    visited = [i for batches in (rank0, rank1) for batch in batches for i in batch]
    assert sorted(visited) == list(range(SAMPLES))  # each sample exactly once, none left out
    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == list(single)  # the same global batches


def test_byol_target_stays_identical_on_both_ranks(two_worker_probe):
    (target0, online0), (target1, online1) = (
        (torch.tensor(seen["target"]), torch.tensor(seen["online"])) for seen in two_worker_probe
    )
    assert torch.equal(online0, online1)  # DDP keeps the online networks equal ...
    assert torch.equal(target0, target1)  # ... and so the EMA keeps the targets equal, bit for bit
    initial, _ = _target_and_online(build_model(load_config(overrides=PROBE_OVERRIDES)))
    assert not torch.allclose(target0, initial)  # the EMA did move the target


def test_resumed_workers_keep_their_own_random_streams(tmp_path):
    config = load_config(overrides=[*TINY, "optim.epochs=1", "optim.warmup_epochs=0"])
    splits = load_splits(config.data)
    first = train_loop(config, lambda m, c: None, WorkerContext(checkpoint_dir=tmp_path), splits=splits)
    states = []
    for rank in (0, 1):  # resume at the last epoch: only the restored RNG state is left afterwards
        train_loop(config, lambda m, c: None, WorkerContext(rank=rank, world_size=2), checkpoint=first.checkpoint,
                   splits=splits)
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], load_checkpoint(first.checkpoint)["rng"]["torch"])  # rank 0 resumes exactly
    assert not torch.equal(states[0], states[1])  # rank 1 must not replay rank 0's augmentations


@pytest.mark.parametrize("workers", ["too_many", "elastic_min_too_many"])
def test_cli_refuses_more_workers_than_the_cluster_holds(ray_cluster, tmp_path, capsys, workers):
    cpus = int(ray.cluster_resources()["CPU"])
    asked = str(cpus + 1) if workers == "too_many" else f"{cpus + 1}:{cpus + 2}"
    code = main(["train", "--workers", asked, "--output", str(tmp_path / "run"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *_settings(TINY)])
    assert code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("ssl-tune: error: ")
    assert f"scaling.min_workers={cpus + 1}" in message and f"the Ray cluster has {cpus} CPU" in message
    assert not (tmp_path / "run" / "ray").exists()  # refused before any Ray Train run started


@pytest.mark.slow  # ~30-45 s: a worker group has to start before it can fail
def test_cli_reports_a_run_that_fails_for_good_in_one_line(ray_cluster, tmp_path, capsys):
    # SyncBatchNorm on CPU workers: every worker raises at its start (a failure only workers can see).
    code = main(["train", "--workers", "2", "--max-failures", "0", "--output", str(tmp_path / "run"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                 *_settings([*TINY, "scaling.sync_batchnorm=true"])])
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ssl-tune: error: ")]
    assert len(lines) == 1
    assert "training failed for good (scaling.max_failures=0 restarts used up): rank " in lines[0]
    assert re.search(r"rank [01]: ConfigError: scaling.sync_batchnorm=true needs GPU workers", lines[0])


# ------------------------------------------------------------------------- slow: nodes come and go, workers die


def _train_in_thread(config) -> tuple[threading.Thread, "queue.Queue[dict]", dict]:
    """``train(config)`` in a thread (Cluster.add_node/remove_node must run on the main thread)."""
    epochs: queue.Queue[dict] = queue.Queue()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = train(config, on_epoch=epochs.put)
        except BaseException as error:  # re-raised by _finish
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, epochs, outcome


def _wait_for(epochs: "queue.Queue[dict]", condition, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            metrics = epochs.get(timeout=1)
        except queue.Empty:
            continue
        if condition(metrics):
            return metrics
    raise AssertionError(f"no epoch met the condition within {timeout_s} s")


def _finish(thread: threading.Thread, outcome: dict, timeout_s: float = 300):
    thread.join(timeout_s)
    assert not thread.is_alive(), f"the run did not end within {timeout_s} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["summary"]


@pytest.mark.slow
def test_elastic_run_grows_then_shrinks_and_finishes(ray_cluster, tmp_path, monkeypatch):
    # After a node leaves, Ray may still count its CPUs for a while and try to start 2 workers; it retries
    # once this start-up timeout (default 60 s) passes, then starts 1.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    head_cpus = int(ray.cluster_resources()["CPU"])  # one worker takes a whole node: only 1 fits at first
    epochs_total = 16
    config = load_config(overrides=[
        *TINY, f"optim.epochs={epochs_total}", "scaling.min_workers=1", "scaling.max_workers=2",
        f"scaling.cpus_per_worker={head_cpus}", "scaling.resize_interval_s=3", "scaling.max_failures=3",
        f"output_dir={tmp_path}",
    ])
    thread, epochs, outcome = _train_in_thread(config)
    _wait_for(epochs, lambda m: m["workers"] == 1)
    node = ray_cluster.add_node(num_cpus=head_cpus)
    try:
        grown = _wait_for(epochs, lambda m: m["workers"] == 2)
        # One more epoch: Ray registers a checkpoint when it next polls the workers (~2 s), so one
        # reported just before the node leaves can be lost (the resumed group would redo that epoch).
        _wait_for(epochs, lambda m: m["workers"] == 2)
    finally:
        ray_cluster.remove_node(node)
    summary = _finish(thread, outcome)

    assert summary.status == Status.FINISHED
    history = summary.history
    assert [m["epoch"] for m in history] == list(range(1, epochs_total + 1))  # every epoch once, none lost
    workers = [m["workers"] for m in history]
    first_two, last_two = workers.index(2), len(workers) - 1 - workers[::-1].index(2)
    assert set(workers[:first_two]) == {1} and set(workers[first_two : last_two + 1]) == {2}
    assert last_two < epochs_total - 1 and set(workers[last_two + 1 :]) == {1}  # shrank back and went on
    # Each resize restarted the group from the last checkpoint, not from scratch:
    assert history[first_two]["restarts"] >= 1 and history[-1]["restarts"] > history[first_two]["restarts"]
    assert grown["epoch"] > 1 and first_two >= 1
    knn = [m["val_knn_acc"] for m in history]
    assert all(math.isfinite(a) for a in knn) and knn[-1] > 0.5
    assert history[-1]["loss"] < history[0]["loss"]
    assert summary.backbone_path.is_file()


def _train_worker_pids(cluster) -> list[int]:
    """PIDs of the live Ray Train worker processes, from Ray's State API."""
    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    return sorted(actor.pid for actor in list_actors(address=cluster.address, filters=filters))


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, tmp_path):
    epochs_total = 8
    config = load_config(overrides=[
        *TINY, f"optim.epochs={epochs_total}", "scaling.min_workers=2", "scaling.max_workers=2",
        "scaling.max_failures=1", f"output_dir={tmp_path}",
    ])
    thread, epochs, outcome = _train_in_thread(config)
    seen = _wait_for(epochs, lambda m: m["epoch"] >= 3)
    pids = _train_worker_pids(ray_cluster)
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)  # mid-epoch 4, as a crashed or OOM-killed process
    summary = _finish(thread, outcome)

    assert summary.status == Status.FINISHED and summary.restarts >= 1
    history = summary.history
    assert [m["epoch"] for m in history] == list(range(1, epochs_total + 1))
    before_kill = [m["epoch"] for m in history if m["restarts"] == 0]
    # Resumed from the last stored checkpoint (Ray may miss one reported within ~2 s of the kill): the epochs
    # done before the kill were kept, at most the last one is redone.
    assert len(before_kill) >= seen["epoch"] - 1 >= 2
    assert all(m["restarts"] >= 1 for m in history[len(before_kill) :])
    assert all(math.isfinite(m["val_knn_acc"]) for m in history) and history[-1]["loss"] < history[0]["loss"]


@pytest.mark.slow  # 50-85 s on a 2-core float32 CPU: a second 2-worker run, streamed by Ray Data
def test_two_workers_streaming_parquet_follow_the_in_memory_run(two_worker_run, digits_parquet, tmp_path):
    """Ray Data splits the rows over the 2 workers; each epoch's exchange restores the in-memory batches."""
    streamed = train(load_config(overrides=[*TWO_WORKERS, *parquet_overrides(digits_parquet, True),
                                            f"output_dir={tmp_path}"]))
    in_memory = two_worker_run[0]
    assert streamed.status == Status.FINISHED and all(m["workers"] == 2 for m in streamed.history)
    keys = ("epoch", "loss", "val_knn_acc", "embedding_std")
    assert [[m[k] for k in keys] for m in streamed.history] == [[m[k] for k in keys] for m in in_memory.history]
    assert 0 < streamed.history[0]["streamed_rows_held"] < 1005  # rank 0 holds its share, not the whole file


def test_more_workers_than_the_cluster_is_an_error_or_a_wait_with_a_message(ray_cluster, capsys):
    config = load_config(overrides=[*TINY, "scaling.min_workers=2", "scaling.max_workers=2",
                                    "scaling.cpus_per_worker=64"])
    with pytest.raises(ConfigError, match=r"scaling.min_workers=2 workers x scaling.cpus_per_worker=64 need 128 CPU"):
        check_capacity(config, may_grow=False)  # a cluster of our own: it will not grow, so say so now
    check_capacity(config, may_grow=True)  # a joined cluster may autoscale: wait, and say why
    assert "waiting for nodes to join" in capsys.readouterr().err
    fits = load_config(overrides=[*TINY, "scaling.min_workers=2", "scaling.max_workers=2"])
    check_capacity(fits, may_grow=False)

