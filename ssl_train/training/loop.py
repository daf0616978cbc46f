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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from tqdm import tqdm

from ssl_train.augment.batched import BatchedViews
from ssl_train.augment.recipes import MultiViewDataset, view_recipes
from ssl_train.config import ConfigError, TrainConfig, check_batch_fits
from ssl_train.data import DatasetSplits, load_splits, load_streamed_set
from ssl_train.data.sharding import GlobalBatchSampler, ShardedImages, loss_weight
from ssl_train.evaluation.evaluate import evaluate_backbone
from ssl_train.evaluation.label_free import embedding_std
from ssl_train.methods import SSLMethod, build_method
from ssl_train.methods.backbones import build_backbone
from ssl_train.status import Status
from ssl_train.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ssl_train.training.optim import base_lr, build_optimizer, build_scheduler

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
    keep_checkpoints: int = 2  # in checkpoint_dir; 1 where Ray persists each (a staging directory)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def in_process_device(config: TrainConfig) -> torch.device:
    """The device of a run that trains in this process: the GPU when asked for and present, else the CPU."""
    return torch.device("cuda" if config.scaling.use_gpu and torch.cuda.is_available() else "cpu")


class RunFailedError(RuntimeError):
    """A run stopped for good: its worker group failed more often than ``scaling.max_failures`` allows."""


@dataclass
class RunOutcome:
    """How a run ended, the same type whichever way it ran: this loop, a Ray Train worker group
    (:func:`~.distributed.fit`) or :func:`~.run.train`, which adds the run directory's files."""

    status: Status
    history: list[dict[str, Any]]  # one metrics dict per epoch, each epoch once
    restarts: int
    checkpoint: Path | None = None  # the last complete checkpoint
    method: nn.Module | None = None  # the trained method, for a run in this process
    output_dir: Path | None = None
    backbone_path: Path | None = None  # backbone.pt of a finished run

    @property
    def metrics(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


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


class EpochBatches:
    """The SSL-train images behind one interface: ``for_epoch(epoch)`` yields this worker's view batches of
    that epoch, whether the images are all in memory or this worker's streamed share.

    ``augment.backend: batched``: the images stay one uint8 tensor on the training device (copied once, through
    pinned memory on CUDA); a batch is an index gather, then :class:`BatchedViews` on the device. ``per_sample``:
    a ``DataLoader`` runs the per-image transforms, in ``data.loader_workers`` processes.
    """

    def __init__(self, config: TrainConfig, images: torch.Tensor | ShardedImages, sampler: GlobalBatchSampler,
                 device: torch.device) -> None:
        self.config, self.images, self.sampler, self.device = config, images, sampler, device
        self.batched = config.augment.backend == "batched"
        if self.batched:
            self.augment = BatchedViews(view_recipes(config))
            if isinstance(images, torch.Tensor):
                self.images = _to_device(images, device)
        elif isinstance(images, torch.Tensor):  # one loader for the run: the sampler picks each epoch's batches
            self.loader = self._loader(images, sampler, persistent=True)

    def _loader(self, images: torch.Tensor, batch_sampler: Iterable[list[int]], persistent: bool = False) -> DataLoader:
        workers = self.config.data.loader_workers
        return DataLoader(MultiViewDataset(images, view_recipes(self.config)), batch_sampler=batch_sampler,
                          num_workers=workers, persistent_workers=persistent and workers > 0)

    def __len__(self) -> int:
        return len(self.images)

    def take_values(self, config: TrainConfig) -> None:
        """Augment with ``config``'s recipes from the next epoch on (a schedule's step)."""
        self.config = config
        if self.batched:
            self.augment = BatchedViews(view_recipes(config))
        elif isinstance(self.images, torch.Tensor):
            self.loader = self._loader(self.images, self.sampler, persistent=True)

    def for_epoch(self, epoch: int) -> Iterable[list[torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        streamed = isinstance(self.images, ShardedImages)
        if streamed:
            # The epoch's exchange hands this worker exactly its slices, already in batch order.
            images = self.images.epoch_images(epoch, self.config.optim.batch_size, self.config.seed)
            batches: Iterable[list[int]] = BatchSampler(SequentialSampler(range(len(images))),
                                                        self.sampler.stop - self.sampler.start, False)
        else:
            images, batches = self.images, self.sampler
        if not self.batched:
            return self._loader(images, batches) if streamed else self.loader
        images = _to_device(images, self.device)
        return (self.augment(images[torch.as_tensor(batch, device=self.device)]) for batch in batches)

    def metrics(self) -> dict[str, Any]:
        if isinstance(self.images, ShardedImages):
            return {"streamed_rows_held": len(self.images.images)}  # this worker's share of the streamed rows
        return {}


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``images`` on ``device``: a CUDA copy goes through pinned memory, without blocking the host."""
    if images.device == device:
        return images
    if device.type == "cuda":
        images = images.pin_memory()
    return images.to(device, non_blocking=True)


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


@dataclass
class TrainState:
    """What a checkpoint holds and a resume restores: the method, optimiser, schedule, progress and RNG."""

    method: SSLMethod
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0

    def state_dict(self, config: TrainConfig, world_size: int) -> dict[str, Any]:
        return {
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "restarts": self.restarts,
            "world_size": world_size,
            "rng": rng_state(),
            "config": config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's state (the RNG last, as it was saved); the restart count goes up by one."""
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.history, self.restarts = state["epoch"], list(state["history"]), state["restarts"] + 1


def train_step(
    model: nn.Module, method: SSLMethod, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None, views: list[torch.Tensor], step: int, epoch: int,
    total_steps: int, loss_weight: float = 1.0, bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One optimisation step at global ``step``: forward (``model`` may be ``method`` wrapped in DDP), the
    weighted backward, the method's hooks around the optimiser and lr steps. Returns (loss, embeddings, extras)."""
    with torch.autocast(device_type=views[0].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, embeddings = model(views, step, epoch)
    optimizer.zero_grad(set_to_none=True)
    (loss * loss_weight).backward()
    method.before_optimizer_step(step)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), embeddings, method.after_optimizer_step(step, total_steps)


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # x86 CPU flags of bf16 arithmetic in hardware


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (``flags`` on x86); empty where there is no such file."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware: AVX512_BF16 or AMX in its own flags.

    oneDNN's ``_is_mkldnn_bf16_supported()`` also answers True on AVX-512 CPUs without either (Skylake to Ice Lake
    Xeons), where it emulates bf16: a training step ran 2.3x slower there than in float32 (issue 35). Elsewhere
    (no flags, other architectures) the answer is no, and trials train in float32."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & NATIVE_BF16_FLAGS) and torch.backends.mkldnn.is_available()


def uses_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast for the training step (``optim.mixed_precision``): on CUDA, and on a CPU with native bf16;
    elsewhere bf16 is emulated and slower than float32."""
    if not config.optim.mixed_precision:
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


class Trainer:
    """One run of one config on one worker: :meth:`fit` runs :meth:`train_one_epoch` and :meth:`epoch_outcome`
    per epoch, reporting metrics and a checkpoint after each.

    ``checkpoint`` (a directory or a loaded state) resumes a run where it stopped: the same weights,
    optimizer, schedule, RNG and data order, so 2 + 2 epochs equal 4. ``streamed`` (with
    ``data.streaming``) is this worker's share of the SSL-train rows from Ray Data.
    """

    def __init__(
        self, config: TrainConfig, report: Reporter, context: WorkerContext | None = None,
        checkpoint: str | Path | dict[str, Any] | None = None, splits: DatasetSplits | None = None,
        streamed: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        self.config, self.report = config, report
        self.context = context = context or WorkerContext()
        self.device = device = context.device
        # The leak check is for the data summary (ssl-tune train / tune print it), not for every worker.
        self.splits = splits or load_splits(replace(config.data, leak_check=False))
        images = _training_images(config, self.splits, streamed, context)
        check_batch_fits(config, len(images))

        method = build_model(config).to(device)
        if config.scaling.sync_batchnorm and context.world_size > 1:
            if device.type != "cuda":  # torch's SyncBatchNorm raises on CPU tensors at the first step
                raise ConfigError(f"scaling.sync_batchnorm=true needs GPU workers, but this worker runs on {device}; "
                                  "set scaling.use_gpu=true on a GPU cluster, or scaling.sync_batchnorm=false")
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        if config.optim.channels_last:
            method = method.to(memory_format=torch.channels_last)
        self.method = method

        sampler = GlobalBatchSampler(len(images), config.optim.batch_size, context.rank, context.world_size,
                                     config.seed)
        self.steps_per_epoch = len(sampler)
        self.total_steps = self.steps_per_epoch * config.optim.epochs
        optimizer = build_optimizer(method, config.optim)
        self.state = TrainState(method, optimizer, build_scheduler(optimizer, config.optim, self.steps_per_epoch))
        self._restore(checkpoint)

        self.model: nn.Module = method
        if context.world_size > 1 and dist.is_initialized():
            # broadcast_buffers=False: the SwAV queue holds each worker's own features. Its successor
            # (forward_sync_buffers) would still sync buffers at init, hence the silenced deprecation.
            device_ids = [device.index] if device.type == "cuda" else None
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
                self.model = nn.parallel.DistributedDataParallel(method, device_ids=device_ids,
                                                                 broadcast_buffers=False)
        if config.optim.compile:
            self.model = torch.compile(self.model)
        self.batches = EpochBatches(config, images, sampler, device)
        self.loss_weight = loss_weight(config.optim.batch_size, context.world_size, context.rank)
        self.bf16 = uses_bf16(config, device)
        self.memory_format = torch.channels_last if config.optim.channels_last else torch.contiguous_format

    def _restore(self, checkpoint: str | Path | dict[str, Any] | None) -> None:
        context = self.context
        if checkpoint is None:
            _seed_everything(self.config.seed + 1_000 * context.rank)
            return
        state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        self.state.load_state_dict(state)
        note = self.method.on_resume(context.world_size, state.get("world_size", 1))
        if note and context.is_main:
            logger.warning(note)
        set_rng_state(state["rng"])
        if context.rank > 0:  # only rank 0's RNG is saved: give the others their own stream again
            _seed_everything(self.config.seed + 1_000 * context.rank + 1_000_000 * self.state.epoch)

    def take_scheduled_values(self, epoch: int) -> None:
        """Before ``epoch``: the values ``schedule:`` gives it, for the augmentations, the lr and the method's knobs.

        Also right after a restore, whose optimiser and method state may hold another schedule's values (PBT copies
        a better member's state, then changes some of its values). A run without a schedule keeps its own."""
        if not self.config.schedule:
            return
        values = self.config.at_epoch(epoch)
        if values.augment != self.batches.config.augment:
            self.batches.take_values(values)
        self.method.take_values(values)
        scheduler = self.state.scheduler
        lr = base_lr(values.optim)
        for i, group in enumerate(self.state.optimizer.param_groups):
            scheduler.base_lrs[i] = lr
            group["lr"] = lr * scheduler.lr_lambdas[i](scheduler.last_epoch)

    def train_one_epoch(self, epoch: int) -> tuple[float, torch.Tensor | None, dict[str, float], float]:
        """Every step of ``epoch``: (mean loss over this worker's steps, last embeddings, last extras, seconds)."""
        self.method.train()
        started = time.perf_counter()
        loss_sum, embeddings, extras = 0.0, None, {}
        steps = tqdm(
            self.batches.for_epoch(epoch), desc=f"epoch {epoch + 1}/{self.config.optim.epochs}", leave=False,
            total=self.steps_per_epoch, disable=not (self.context.show_progress and self.context.is_main),
        )
        for step_in_epoch, views in enumerate(steps):
            step = epoch * self.steps_per_epoch + step_in_epoch
            views = [v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in views]
            loss, embeddings, extras = train_step(
                self.model, self.method, self.state.optimizer, self.state.scheduler, views, step, epoch,
                self.total_steps, self.loss_weight, self.bf16,
            )
            loss_sum += loss.item()
            steps.set_postfix(loss=f"{loss.item():.3f}")
        return loss_sum / self.steps_per_epoch, embeddings, extras, time.perf_counter() - started

    def epoch_outcome(self, epoch: int, mean_loss: float, embeddings: torch.Tensor | None, extras: dict[str, float],
                      seconds: float) -> tuple[dict[str, Any], Status]:
        """The epoch's metrics (val every ``eval.every_epochs`` and at the end; test once, after the last epoch
        of a finished run when ``eval.test_at_end`` and the data has labels) and the run's status after it."""
        config, context = self.config, self.context
        mean_loss = _mean_over_workers(mean_loss, context)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": mean_loss,
            "lr": self.state.scheduler.get_last_lr()[0],
            "images_per_s": self.steps_per_epoch * config.optim.batch_size / seconds,
            "workers": context.world_size,
            "restarts": self.state.restarts,
            **extras,
            **self.batches.metrics(),
        }
        status = Status.FINISHED
        if not math.isfinite(mean_loss):
            status = Status.DIVERGED
        if status != Status.DIVERGED:
            metrics["embedding_std"] = _mean_over_workers(embedding_std(embeddings.float()), context)
            last_epoch = epoch + 1 == config.optim.epochs
            if context.is_main and ((epoch + 1) % config.eval.every_epochs == 0 or last_epoch):
                metrics.update(evaluate_backbone(self.method.backbone, self.splits, config.eval, self.device,
                                                 split="val", bf16=self.bf16))
            past_grace = epoch + 1 > config.eval.collapse_grace_epochs
            if past_grace and metrics["embedding_std"] < config.eval.collapse_threshold:
                status = Status.COLLAPSED
            elif context.is_main and last_epoch and config.eval.test_at_end and self.splits.labeled:  # once, at the end
                metrics.update(evaluate_backbone(self.method.backbone, self.splits, config.eval, self.device,
                                                 split="test", bf16=self.bf16))
        # .value: plain text in the metrics (and so in checkpoints, which load with weights_only=True)
        metrics["status"] = (Status.RUNNING if status == Status.FINISHED and epoch + 1 < config.optim.epochs
                             else status).value
        return metrics, status

    def fit(self) -> RunOutcome:
        """Train the remaining epochs; after each, report its metrics and (rank 0) its checkpoint."""
        status, last_checkpoint = Status.FINISHED, None
        for epoch in range(self.state.epoch, self.config.optim.epochs):
            self.take_scheduled_values(epoch)
            metrics, status = self.epoch_outcome(epoch, *self.train_one_epoch(epoch))
            self.state.history.append(metrics)
            self.state.epoch = epoch + 1
            if status != Status.DIVERGED and self.context.checkpoint_dir is not None and self.context.is_main:
                last_checkpoint = save_checkpoint(self.state.state_dict(self.config, self.context.world_size),
                                                  self.context.checkpoint_dir, epoch + 1,
                                                  keep=self.context.keep_checkpoints)
            self.report(metrics, last_checkpoint if self.context.is_main else None)
            if status != Status.FINISHED:
                break
        return RunOutcome(status, self.state.history, self.state.restarts, last_checkpoint, self.method)


def train_loop(
    config: TrainConfig,
    report: Reporter,
    context: WorkerContext | None = None,
    checkpoint: str | Path | dict[str, Any] | None = None,
    splits: DatasetSplits | None = None,
    streamed: Iterable[dict[str, Any]] | None = None,
) -> RunOutcome:
    """Train ``config.method`` for ``config.optim.epochs`` epochs; report metrics and a checkpoint each epoch
    (see :class:`Trainer`)."""
    return Trainer(config, report, context, checkpoint, splits, streamed).fit()
