"""The train loop under Ray Train: DDP over N workers, elastic between min and max, resumed after failures.

Ray Train V2 starts the worker group, sets up the process group (gloo on CPU, NCCL on
GPU), restarts the group from the latest reported checkpoint when a worker dies
(``FailureConfig(max_failures)``) and, with ``num_workers=(min, max)``, grows or shrinks
it as nodes come and go. The loop itself keeps the optimisation independent of the worker
count (see :mod:`ssl_train.sharding`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ssl_train.checkpoint import load_checkpoint, save_checkpoint
from ssl_train.config import TrainConfig, from_dict
from ssl_train.loop import WorkerContext, train_loop

Reporter = Callable[[dict[str, Any], "Path | None"], None]


def scaling_config(config: TrainConfig) -> ScalingConfig:
    """Ray's ScalingConfig for ``config.scaling``: a fixed size or an elastic (min, max) range."""
    s = config.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    workers: int | tuple[int, int] = s.min_workers if s.min_workers == s.max_workers else (s.min_workers, s.max_workers)
    return ScalingConfig(
        num_workers=workers,
        use_gpu=s.use_gpu,
        resources_per_worker=resources,
        elastic_resize_monitor_interval_s=s.resize_interval_s,
    )


def _worker_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """What each Ray Train worker runs: the train loop with Ray's context, reporter and checkpoint."""
    config = from_dict(loop_config["config"])
    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)
    elif loop_config.get("resume_from"):
        state = load_checkpoint(loop_config["resume_from"])
    else:
        state = None

    rank = context.get_world_rank()
    echo = loop_config.get("echo")

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if rank == 0 and echo is not None:
            echo(metrics)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    with tempfile.TemporaryDirectory(prefix="ssl-tune-ckpt-") as staging:
        worker = WorkerContext(
            rank=rank,
            world_size=context.get_world_size(),
            device=ray.train.torch.get_device(),
            checkpoint_dir=Path(staging),
        )
        result = train_loop(config, report, worker, checkpoint=state)
    return {"status": result.status, "history": result.history, "restarts": result.restarts}


def build_trainer(
    config: TrainConfig,
    *,
    name: str,
    storage: str,
    resume_from: Path | None = None,
    callbacks: Sequence[Any] = (),
    echo: Callable[[dict[str, Any]], None] | None = None,
) -> TorchTrainer:
    """A TorchTrainer running :func:`train_loop` for ``config`` (used by ``fit`` and by multi-worker Tune trials)."""
    return TorchTrainer(
        _worker_loop,
        train_loop_config={
            "config": config.to_dict(),
            "resume_from": str(resume_from) if resume_from else None,
            "echo": echo,
        },
        scaling_config=scaling_config(config),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` (an existing cluster), or start a local one, once per process."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)


def fit(
    config: TrainConfig, record: Reporter, *, resume_from: Path | None = None, address: str | None = None
) -> tuple[str, list[dict[str, Any]], Path | None, int]:
    """Run ``config`` under Ray Train; returns (status, history, local checkpoint, restarts).

    Rank 0 prints each epoch as it ends (Ray forwards worker output); ``record`` receives
    the full history once the run is over, and the last checkpoint is copied into the run
    directory so ``ssl-tune train --resume`` works the same as for in-process runs.
    """
    from ssl_train.cli import format_epoch

    ensure_ray(address)
    output_dir = Path(config.output_dir).resolve()
    storage = config.scaling.storage or str(output_dir / "ray")
    trainer = build_trainer(
        config,
        name=f"train-{time.strftime('%Y%m%d-%H%M%S')}",
        storage=storage,
        resume_from=resume_from,
        echo=lambda metrics: print(format_epoch(metrics), flush=True),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    summary = result.return_value or {}
    history = summary.get("history", [])
    for metrics in history:
        record(metrics, None)
    local = None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)
        local = save_checkpoint(state, output_dir / "checkpoints", int(state["epoch"]))
    return summary.get("status", "failed"), history, local, summary.get("restarts", 0)
