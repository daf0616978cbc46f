"""The one train loop: a config in, a trained backbone and per-epoch metrics out.

It runs the same way in a plain Python process, on each Ray Train worker, and inside a
Ray Tune trial: the caller hands it a :class:`WorkerContext` (rank, world size, device)
and a ``report`` function (``ray.train.report``, ``ray.tune.report`` or a plain
callback), so this module imports nothing from Ray, Tune or MLflow.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from tqdm import tqdm

from ssl_train.augment import MultiViewDataset, ViewRecipe, view_recipes
from ssl_train.backbones import build_backbone
from ssl_train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ssl_train.config import ConfigError, TrainConfig, check_batch_fits
from ssl_train.data import DatasetSplits, load_splits, load_streamed_set
from ssl_train.evaluate import embedding_std, evaluate_backbone
from ssl_train.methods import build_method
from ssl_train.optim import build_optimizer, build_scheduler
from ssl_train.sharding import GlobalBatchSampler, ShardedImages, loss_weight
from ssl_train.status import Status

logger = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any], "Path | None"], None]


@dataclass
class WorkerContext:
    """Where this copy of the loop runs: its rank among ``world_size`` workers and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    checkpoint_dir: Path | None = None
    show_progress: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def in_process_device(config: TrainConfig) -> torch.device:
    """The device of a run that trains in this process: the GPU when asked for and present, else the CPU."""
    return torch.device("cuda" if config.scaling.use_gpu and torch.cuda.is_available() else "cpu")


class RunFailedError(RuntimeError):
    """A run stopped for good: its worker group failed more often than ``scaling.max_failures`` allows."""


@dataclass
class TrainResult:
    status: str
    epochs_completed: int
    history: list[dict[str, Any]]
    checkpoint: Path | None
    restarts: int
    method: nn.Module

    @property
    def metrics(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def backbone(self) -> nn.Module:
        return self.method.backbone


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _mean_over_workers(value: float, context: WorkerContext) -> float:
    if context.world_size == 1 or not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.item() / context.world_size


def build_model(config: TrainConfig) -> nn.Module:
    """The SSL method (online + target networks or prototypes) around a fresh backbone."""
    torch.manual_seed(config.seed)  # identical initial weights on every worker
    return build_method(build_backbone(config.backbone), config)


def _training_images(
    config: TrainConfig, splits: DatasetSplits, streamed: Iterable[dict[str, Any]] | None, context: WorkerContext
) -> torch.Tensor | ShardedImages:
    """The SSL-train images: all of them in memory, or this worker's streamed share (``data.streaming``).

    A streamed run with no stream (one worker training in this process: ``train()``, a one-worker
    Tune trial) reads the same rows into memory: one process needs them all anyway.
    """
    if splits.ssl_train is not None:
        return splits.ssl_train.images
    if streamed is not None:
        return ShardedImages.from_batches(streamed, config.data.image_size, context.rank, context.world_size)
    return load_streamed_set(config.data).images


def _epoch_loader(images: torch.Tensor, recipes: list[ViewRecipe], sampler: GlobalBatchSampler,
                  config: TrainConfig) -> DataLoader:
    """Views of one epoch's streamed images, already in this worker's batch order."""
    return DataLoader(
        MultiViewDataset(images, recipes),
        batch_sampler=BatchSampler(SequentialSampler(range(len(images))), sampler.stop - sampler.start, False),
        num_workers=config.data.loader_workers,
    )


def train_loop(
    config: TrainConfig,
    report: Reporter,
    context: WorkerContext | None = None,
    checkpoint: str | Path | dict[str, Any] | None = None,
    splits: DatasetSplits | None = None,
    streamed: Iterable[dict[str, Any]] | None = None,
) -> TrainResult:
    """Train ``config.method`` for ``config.optim.epochs`` epochs; report metrics and a checkpoint each epoch.

    ``checkpoint`` (a directory or a loaded state) resumes a run where it stopped: the
    same weights, optimizer, schedule, RNG and data order, so 2 + 2 epochs equal 4.
    ``streamed`` (with ``data.streaming``) is this worker's share of the SSL-train rows from Ray Data.
    """
    context = context or WorkerContext()
    device = context.device
    splits = splits or load_splits(config.data)
    images = _training_images(config, splits, streamed, context)
    check_batch_fits(config, len(images))

    method = build_model(config).to(device)
    if config.scaling.sync_batchnorm and context.world_size > 1:
        if device.type != "cuda":  # torch's SyncBatchNorm raises on CPU tensors at the first step
            raise ConfigError(f"scaling.sync_batchnorm=true needs GPU workers, but this worker runs on {device}; "
                              "set scaling.use_gpu=true on a GPU cluster, or scaling.sync_batchnorm=false")
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if config.optim.channels_last:
        method = method.to(memory_format=torch.channels_last)

    sampler = GlobalBatchSampler(len(images), config.optim.batch_size, context.rank, context.world_size, config.seed)
    steps_per_epoch = len(sampler)
    total_steps = steps_per_epoch * config.optim.epochs
    optimizer = build_optimizer(method, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, steps_per_epoch)

    start_epoch, history, restarts = 0, [], 0
    if checkpoint is not None:
        state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], list(state["history"])
        restarts = state["restarts"] + 1
        note = method.on_resume(context.world_size, state.get("world_size", 1))
        if note and context.is_main:
            logger.warning(note)
        set_rng_state(state["rng"])
        if context.rank > 0:  # only rank 0's RNG is saved: give the others their own stream again
            _seed_everything(config.seed + 1_000 * context.rank + 1_000_000 * start_epoch)
    else:
        _seed_everything(config.seed + 1_000 * context.rank)

    model: nn.Module = method
    if context.world_size > 1 and dist.is_initialized():
        # broadcast_buffers=False: the SwAV queue holds each worker's own features. Its successor
        # (forward_sync_buffers) would still sync buffers at init, hence the silenced deprecation.
        device_ids = [device.index] if device.type == "cuda" else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            model = nn.parallel.DistributedDataParallel(method, device_ids=device_ids, broadcast_buffers=False)

    recipes = view_recipes(config)
    if isinstance(images, torch.Tensor):
        loader = DataLoader(
            MultiViewDataset(images, recipes),
            batch_sampler=sampler,
            num_workers=config.data.loader_workers,
            persistent_workers=config.data.loader_workers > 0,
        )
    weight = loss_weight(config.optim.batch_size, context.world_size, context.rank)
    use_bf16 = device.type == "cuda" and config.optim.mixed_precision
    memory_format = torch.channels_last if config.optim.channels_last else torch.contiguous_format

    status, last_checkpoint = Status.FINISHED, None
    for epoch in range(start_epoch, config.optim.epochs):
        method.train()
        sampler.set_epoch(epoch)
        if isinstance(images, ShardedImages):
            loader = _epoch_loader(images.epoch_images(epoch, config.optim.batch_size, config.seed),
                                   recipes, sampler, config)
        started = time.perf_counter()
        loss_sum, embeddings, extras = 0.0, None, {}
        steps = tqdm(
            loader, desc=f"epoch {epoch + 1}/{config.optim.epochs}", leave=False,
            disable=not (context.show_progress and context.is_main),
        )
        for step_in_epoch, views in enumerate(steps):
            step = epoch * steps_per_epoch + step_in_epoch
            views = [v.to(device, non_blocking=True, memory_format=memory_format) for v in views]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, embeddings = model(views, step, epoch)
            optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
            method.before_optimizer_step(step)
            optimizer.step()
            scheduler.step()
            extras = method.after_optimizer_step(step, total_steps)
            loss_sum += loss.item()
            steps.set_postfix(loss=f"{loss.item():.3f}")
        train_seconds = time.perf_counter() - started

        mean_loss = _mean_over_workers(loss_sum / steps_per_epoch, context)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": mean_loss,
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": steps_per_epoch * config.optim.batch_size / train_seconds,
            "workers": context.world_size,
            "restarts": restarts,
            **extras,
        }
        if isinstance(images, ShardedImages):
            metrics["streamed_rows_held"] = len(images.images)  # this worker's share of the streamed rows
        if not math.isfinite(mean_loss):
            status = Status.DIVERGED
        if status != Status.DIVERGED:
            metrics["embedding_std"] = _mean_over_workers(embedding_std(embeddings.float()), context)
            last_epoch = epoch + 1 == config.optim.epochs
            if context.is_main and ((epoch + 1) % config.eval.every_epochs == 0 or last_epoch):
                metrics.update(evaluate_backbone(method.backbone, splits, config.eval, device, split="val"))
            past_grace = epoch + 1 > config.eval.collapse_grace_epochs
            if past_grace and metrics["embedding_std"] < config.eval.collapse_threshold:
                status = Status.COLLAPSED
            elif context.is_main and last_epoch and config.eval.test_at_end:  # once, on the finished run only
                metrics.update(evaluate_backbone(method.backbone, splits, config.eval, device, split="test"))
        # .value: plain text in the metrics (and so in checkpoints, which load with weights_only=True)
        metrics["status"] = (Status.RUNNING if status == Status.FINISHED and epoch + 1 < config.optim.epochs
                             else status).value
        history.append(metrics)

        if status != Status.DIVERGED and context.checkpoint_dir is not None:
            if context.is_main:
                last_checkpoint = save_checkpoint(
                    {
                        "method": method.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch + 1,
                        "history": history,
                        "restarts": restarts,
                        "world_size": context.world_size,
                        "rng": rng_state(),
                        "config": config.to_dict(),
                    },
                    context.checkpoint_dir,
                    epoch + 1,
                )
        report(metrics, last_checkpoint if context.is_main else None)
        if status != Status.FINISHED:
            break

    return TrainResult(
        status=status,
        epochs_completed=len(history) - (status == Status.DIVERGED),
        history=history,
        checkpoint=last_checkpoint,
        restarts=restarts,
        method=method,
    )

