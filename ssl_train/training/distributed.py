"""The train loop under Ray Train: DDP over N workers, elastic between min and max, resumed after failures.

Ray Train V2 starts the worker group, sets up the process group (gloo on CPU, NCCL on
GPU), restarts the group from the latest reported checkpoint when a worker dies
(``FailureConfig(max_failures)``) and, with ``num_workers=(min, max)``, grows or shrinks
it as nodes come and go. The loop itself keeps the optimisation independent of the worker
count (see :mod:`ssl_train.data.sharding`).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
    WorkerGroupError,
)
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ssl_train.config import TrainConfig, from_dict
from ssl_train.data import uris
from ssl_train.data.streaming import SSL_DATASET, STREAMING_CPUS, EveryRowOnce, ssl_dataset, streamed_rows
from ssl_train.status import Status
from ssl_train.training.checkpoint import load_checkpoint, save_checkpoint
from ssl_train.training.loop import Reporter, RunFailedError, RunOutcome, WorkerContext, train_loop
from ssl_train.training.resources import refusal, shortfall, worker_resources


def scaling_config(config: TrainConfig) -> ScalingConfig:
    """Ray's ScalingConfig for ``config.scaling``: a fixed size or an elastic (min, max) range."""
    s = config.scaling
    workers: int | tuple[int, int] = s.min_workers if s.min_workers == s.max_workers else (s.min_workers, s.max_workers)
    return ScalingConfig(
        num_workers=workers,
        use_gpu=s.use_gpu,
        resources_per_worker=worker_resources(config),
        elastic_resize_monitor_interval_s=s.resize_interval_s,
    )


def checkpoint_state(checkpoint: Checkpoint | None) -> dict[str, Any] | None:
    """The train-loop state inside a Ray checkpoint (Train's or Tune's), or None when there is none."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_checkpoint(directory)


def _worker_loop(loop_config: dict[str, Any]) -> RunOutcome:
    """What each Ray Train worker runs: the train loop with Ray's context, reporter and checkpoint."""
    config = from_dict(loop_config["config"])
    context = ray.train.get_context()
    state = checkpoint_state(ray.train.get_checkpoint())
    if state is None and loop_config.get("resume_from"):
        state = load_checkpoint(loop_config["resume_from"])

    rank = context.get_world_rank()
    progress: Queue | None = loop_config.get("progress")
    paced: Queue | None = loop_config.get("paced")
    streamed = streamed_rows(ray.train.get_dataset_shard(SSL_DATASET)) if config.data.streaming else None

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)
        if rank == 0 and progress is not None:
            progress.put(metrics)  # after report: the driver hears of an epoch once its checkpoint is stored
        if rank == 0 and paced is not None:
            paced.get()  # the next epoch waits until the driver has acted on this one (the others wait for rank 0)

    with tempfile.TemporaryDirectory(prefix="ssl-tune-ckpt-") as staging:
        worker = WorkerContext(
            rank=rank,
            world_size=context.get_world_size(),
            device=ray.train.torch.get_device(),
            checkpoint_dir=Path(staging),
            keep_checkpoints=1,  # ray.train.report has stored it by the time the next one is written
        )
        result = train_loop(config, report, worker, checkpoint=state, streamed=streamed)
    return dataclasses.replace(result, method=None, checkpoint=None)  # the driver gets the checkpoint from Ray


def build_trainer(
    config: TrainConfig,
    *,
    name: str,
    storage: str,
    resume_from: Path | None = None,
    callbacks: Sequence[Any] = (),
    progress: Queue | None = None,
    paced: Queue | None = None,
    keep_checkpoints: int = 2,
) -> TorchTrainer:
    """A TorchTrainer running :func:`train_loop` for ``config`` (used by ``fit`` and by multi-worker Tune trials).

    ``progress``, when given, receives rank 0's metrics after every epoch; with ``paced``, rank 0 then waits for an
    item in it before the next epoch (a PBT member: Tune decides on each epoch before the next trains). With
    ``data.streaming`` the SSL-train rows reach the workers as a Ray Dataset split over them. Ray keeps the newest
    ``keep_checkpoints`` checkpoints in ``storage``.
    """
    streaming = config.data.streaming
    return TorchTrainer(
        _worker_loop,
        train_loop_config={
            "config": config.to_dict(),
            "resume_from": str(resume_from) if resume_from else None,
            "progress": progress,
            "paced": paced,
        },
        scaling_config=scaling_config(config),
        datasets={SSL_DATASET: ssl_dataset(config.data)} if streaming else None,
        dataset_config=EveryRowOnce() if streaming else None,
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )


def ensure_ray(address: str | None = None, dashboard: bool = True) -> None:
    """Connect to ``address`` (an existing cluster, refused at once when it does not answer), or start a local
    one, once per process.

    ``dashboard=False`` starts a local cluster without Ray's dashboard: 1.5-2 s and a few CPU-seconds less on a
    2-core machine. Only where no Ray Train run will be stopped from outside: Train V2 frees a stopped run's workers
    through the State API, which the dashboard serves (DESIGN.md, "Tune over Train: measured pitfalls").
    """
    if not ray.is_initialized():
        uris.check_ray_address(address)
        ray.init(address=address, log_to_driver=True, **({} if dashboard or address else {"include_dashboard": False}))


def check_capacity(config: TrainConfig, *, may_grow: bool) -> None:
    """Fail early when the cluster cannot hold ``scaling.min_workers`` workers (Ray would wait forever).

    With ``may_grow`` (a cluster joined by address, which an autoscaler may enlarge) print that
    the run waits for nodes instead of failing.
    """
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    largest = {key: max((node.get(key, 0.0) for node in nodes), default=0.0) for key in worker_resources(config)}
    found = shortfall(config, largest, ray.cluster_resources(), "the Ray cluster",
                      STREAMING_CPUS if config.data.streaming else 0.0)
    if found is None:
        return
    if may_grow:
        print(f"ssl-tune: {found[0]}: waiting for nodes to join", file=sys.stderr, flush=True)
        return
    raise refusal(*found)


def _failure_message(error: TrainingFailedError, max_failures: int) -> str:
    """One line: which ranks failed with what, after how many restarts."""
    if isinstance(error, WorkerGroupError):
        causes = "; ".join(
            f"rank {rank}: {type(cause).__name__}: {_first_line(cause)}"
            for rank, cause in sorted(error.worker_failures.items())
        )
        return f"training failed for good (scaling.max_failures={max_failures} restarts used up): {causes}"
    return f"training failed: {type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else repr(error)


def _relay(progress: Queue, record: Reporter, wait_s: float) -> None:
    """Hand the metrics that rank 0 queued to ``record``, waiting up to ``wait_s`` for the first."""
    try:
        metrics = progress.get(timeout=wait_s) if wait_s > 0 else progress.get_nowait()
        while True:
            record(metrics, None)
            metrics = progress.get_nowait()
    except Empty:
        return


def fit_in_background(trainer: TorchTrainer) -> tuple[threading.Thread, dict[str, Any]]:
    """``trainer.fit()`` in a daemon thread, so that the caller relays its reports and Ctrl-C still ends the process;
    the dict receives the ``result``, or the ``error`` it raised."""
    ended: dict[str, Any] = {}

    def run() -> None:
        try:
            ended["result"] = trainer.fit()
        except BaseException as error:  # handed to the calling thread
            ended["error"] = error

    runner = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    runner.start()
    return runner, ended


def fit(
    config: TrainConfig, record: Reporter, *, resume_from: Path | None = None, address: str | None = None
) -> RunOutcome:
    """Run ``config`` under Ray Train; returns how it ended, with the last checkpoint copied here.

    ``record`` receives rank 0's metrics as each epoch ends (an epoch redone after a restart
    is recorded again; the returned history has each epoch once). The last checkpoint is
    copied into the run directory so ``ssl-tune train --resume`` works the same as for
    in-process runs. Raises :class:`RunFailedError` when the failures exceed ``scaling.max_failures``.
    """
    config = config.with_absolute_paths()  # the workers start in other directories
    ensure_ray(address)
    check_capacity(config, may_grow=address is not None)
    output_dir = Path(config.output_dir).resolve()
    storage = config.scaling.storage or str(output_dir / "ray")
    # On the driver's node, as Train's controller: a queue on a node that leaves would take the run down.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    trainer = build_trainer(
        # A unique name: Ray resumes a run whose name and storage it finds again.
        config, name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", storage=storage,
        resume_from=resume_from,
        progress=progress,
    )
    runner, ended = fit_in_background(trainer)
    while runner.is_alive():
        _relay(progress, record, wait_s=1.0)
    _relay(progress, record, wait_s=0)
    progress.shutdown()
    error = ended.get("error")
    if isinstance(error, TrainingFailedError):
        raise RunFailedError(_failure_message(error, config.scaling.max_failures)) from error
    if error is not None:
        raise error
    result = ended["result"]
    outcome = result.return_value or RunOutcome(Status.FAILED, [], 0)
    state = checkpoint_state(result.checkpoint)
    if state is not None:
        outcome.checkpoint = save_checkpoint(state, output_dir / "checkpoints", int(state["epoch"]))
    return outcome
