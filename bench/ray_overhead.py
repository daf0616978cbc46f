"""What Ray Train costs us: epoch time under Ray Train (1 worker) vs a plain PyTorch loop, and fixed start-up.

Same model, data, global batches, optimizer and thread count on every path, measured in one run:

- plain: a bare PyTorch loop (model, loader, optimizer, schedule; no eval, checkpoint or report);
- in-process: ``ssl_train.training.loop.train_loop`` in this process (what ``train()`` runs for 1 worker);
- ray-1: ``ssl_train.training.distributed.fit`` with 1 Ray Train worker (what ``train()`` runs for 2+ workers
  or an address).

Epoch time is the steady-state period between consecutive epochs (the first and the last epoch left out: warm-up,
final kNN eval). The fixed start-up of a path is its wall time minus its epochs' time. Usage::

    python -m bench.ray_overhead               # ~7 min on 2 cores; appends its section to bench/RESULTS.md
    python -m bench.ray_overhead --print-only  # only print it
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.cluster_utils import Cluster
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from bench.common import append_section
from ssl_train.augment.batched import build_augmenter
from ssl_train.config import TrainConfig, load_config
from ssl_train.data import DatasetSplits, load_splits
from ssl_train.data.sharding import GlobalBatchSampler
from ssl_train.training.distributed import fit
from ssl_train.training.loop import Trainer, WorkerContext, build_model, train_loop, train_step
from ssl_train.training.optim import build_optimizer, build_scheduler

BASE = ["data.image_size=16", "backbone.width=16", "optim.batch_size=128", "eval.knn_k=20", "optim.warmup_epochs=1"]
TINY = ["data.image_size=8", "backbone.width=8", "optim.batch_size=128", "eval.knn_k=20", "optim.epochs=2",
        "optim.warmup_epochs=0", "byol.projector_hidden_dim=64", "byol.predictor_hidden_dim=64",
        "byol.projector_out_dim=32"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def steady(periods: list[float]) -> float:
    """Median epoch period without the first (warm-up) and last (final eval) epochs."""
    return statistics.median(periods[1:-1] if len(periods) > 2 else periods)


def plain_loop(config: TrainConfig, splits: DatasetSplits) -> list[float]:
    """The same optimisation as a bare PyTorch loop; returns each epoch's seconds."""
    method = build_model(config)
    sampler = GlobalBatchSampler(len(splits.ssl_train), config.optim.batch_size, 0, 1, config.seed)
    augment, images = build_augmenter(config), splits.ssl_train.images  # augment.backend's views, as the loop's
    optimizer = build_optimizer(method, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, len(sampler))
    total = len(sampler) * config.optim.epochs
    periods = []
    for epoch in range(config.optim.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        method.train()
        for i, batch in enumerate(sampler):
            views = augment(images[batch])
            train_step(method, method, optimizer, scheduler, views, epoch * len(sampler) + i, epoch, total)
        periods.append(time.perf_counter() - started)
    return periods


def timed(run, images_per_epoch: int) -> tuple[float, list[float], list[float]]:  # noqa: ANN001 - run(record)
    """Wall time of ``run(record)``, the times at which it recorded each epoch, and each epoch's train-step seconds."""
    stamps: list[float] = []
    step_seconds: list[float] = []
    started = time.perf_counter()

    def record(metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        stamps.append(time.perf_counter() - started)
        step_seconds.append(images_per_epoch / metrics["images_per_s"])

    run(record)
    return time.perf_counter() - started, stamps, step_seconds


def periods_and_fixed(wall: float, stamps: list[float]) -> tuple[list[float], float]:
    """Epoch periods (the first taken as the steady period) and the fixed cost: wall minus all epochs."""
    periods = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    first = steady(periods) if periods else stamps[0]
    return [first, *periods], wall - first - sum(periods)


def images_per_epoch(config: TrainConfig, splits: DatasetSplits) -> int:
    return len(splits.ssl_train) // config.optim.batch_size * config.optim.batch_size


def in_process(config: TrainConfig, images: int) -> tuple[float, list[float], list[float]]:
    def run(record):  # noqa: ANN001, ANN202
        with tempfile.TemporaryDirectory() as directory:
            train_loop(config, record, WorkerContext(checkpoint_dir=Path(directory)))
    return timed(run, images)


def ray_path(config: TrainConfig, workers: int, images: int) -> tuple[float, list[float], list[float]]:
    config = config.replace({"scaling.min_workers": workers, "scaling.max_workers": workers})
    return timed(lambda record: fit(config, record), images)


def median_step_seconds(config: TrainConfig, steps: int, threads: int) -> tuple[float, int]:
    """Median seconds of one ``train_step`` (views made beforehand) in the calling process, and its niceness."""
    torch.set_num_threads(threads)
    trainer = Trainer(config, lambda metrics, checkpoint: None)
    batches = iter(trainer.batches.for_epoch(0))
    views = [next(batches) for _ in range(4)]
    seconds = []
    for k in range(steps):
        started = time.perf_counter()
        train_step(trainer.model, trainer.method, trainer.state.optimizer, trainer.state.scheduler, views[k % 4], k, 0,
                   trainer.total_steps)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[2:]), os.nice(0)


@ray.remote(num_cpus=1)
class StepHost:
    """A Ray worker process that times train steps, as a trial or Train worker would run them."""

    def median_step_seconds(self, config: TrainConfig, steps: int, threads: int) -> tuple[float, int]:
        return median_step_seconds(config, steps, threads)


def steps_by_host(config: TrainConfig, threads: int, rounds: int = 5, steps: int = 40) -> dict[str, list[float]]:
    """The same train steps in this process and in Ray actors at Ray's default nice 15 and at nice 0,
    interleaved round by round; per host, each round's median step seconds."""
    hosts = {f"Ray actor, nice {nice}": StepHost.options(runtime_env={"env_vars": {"RAY_worker_niceness": nice}})
             .remote() for nice in ("15", "0")}
    seconds: dict[str, list[float]] = {"this process (driver), nice 0": []}
    for _ in range(rounds):
        seconds["this process (driver), nice 0"].append(median_step_seconds(config, steps, threads)[0])
        for name, host in hosts.items():
            step, nice = ray.get(host.median_step_seconds.remote(config, steps, threads))
            assert name.endswith(f"nice {nice}"), (name, nice)
            seconds.setdefault(name, []).append(step)
    return seconds


def trivial_fit(workers: int, storage: str) -> dict[str, float]:
    """A TorchTrainer whose loop only reports once: Ray Train's own start-up and tear-down."""

    def loop(_config: dict[str, Any]) -> dict[str, float]:
        entered = time.time()
        ray.train.report({"x": 1})
        return {"entered": entered, "left": time.time()}

    called = time.time()
    result = TorchTrainer(
        loop, scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"trivial-{workers}-{time.time_ns()}", storage_path=storage),
    ).fit()
    returned = time.time()
    inside = result.return_value
    return {"start": inside["entered"] - called, "end": returned - inside["left"], "total": returned - called}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the throughput runs (~60 s each here)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads = CPUs of the Ray worker")
    parser.add_argument("--print-only", action="store_true", help="print the section, do not append it to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # a Ray worker gets OMP_NUM_THREADS = its CPUs
    work = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    config = load_config(overrides=[*BASE, f"optim.epochs={args.epochs}", f"eval.every_epochs={args.epochs}",
                                    f"scaling.cpus_per_worker={args.threads}", f"output_dir={work / 'run'}"])
    tiny = load_config(overrides=[*TINY, f"output_dir={work / 'tiny'}"])
    splits = load_splits(config.data)
    rows: dict[str, Any] = {"load": os.getloadavg()[0]}

    images, tiny_images = images_per_epoch(config, splits), images_per_epoch(tiny, splits)
    # Ray first, so that every path runs beside the same Ray daemons (GCS, raylet, dashboard).
    # Own dashboard port and RAY_ADDRESS: other Ray instances on this machine must not be mistaken for ours.
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "dashboard_port": free_port()})
    ray.init(address=cluster.address, runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}})
    rows["ray_start"] = time.perf_counter() - started

    rows["plain"] = plain_loop(config, splits)
    wall, stamps, rows["in_process_steps"] = in_process(config, images)
    rows["in_process"] = periods_and_fixed(wall, stamps)[0]
    wall, stamps, rows["ray_1_steps"] = ray_path(config, 1, images)
    rows["ray_1"] = periods_and_fixed(wall, stamps)[0]

    rows["by_host"] = steps_by_host(config, args.threads)
    fixed = {"in-process train_loop": periods_and_fixed(*in_process(tiny, tiny_images)[:2])[1]}
    for workers in (1, 2):
        fixed[f"fit(), {workers} Ray Train worker(s)"] = periods_and_fixed(*ray_path(tiny, workers, tiny_images)[:2])[1]
    trivial = {workers: trivial_fit(workers, str(work / "trivial")) for workers in (1, 2)}
    rows["load_end"] = os.getloadavg()[0]
    ray.shutdown()
    cluster.shutdown()

    section = report(config, rows, fixed, trivial, args)
    print(section)
    if not args.print_only:
        append_section(section)


def report(config: TrainConfig, rows: dict[str, Any], fixed: dict[str, float], trivial: dict[int, dict[str, float]],
           args: argparse.Namespace) -> str:
    plain, local, ray1 = steady(rows["plain"]), steady(rows["in_process"]), steady(rows["ray_1"])
    steps = len(load_splits(config.data).ssl_train) // config.optim.batch_size
    lines = [
        "## Ray Train overhead (bench/ray_overhead.py)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs ({platform.machine()}),"
        f" Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__};"
        f" load average {rows['load']:.1f} at the start, {rows['load_end']:.1f} at the end.",
        "",
        f"Throughput runs: BYOL, small_cnn width {config.backbone.width}, {config.data.image_size}px digits,"
        f" global batch {config.optim.batch_size} ({steps} steps/epoch), {config.optim.epochs} epochs,"
        f" {args.threads} torch thread(s) / CPU(s) per worker; kNN only after the last epoch; all three paths run"
        " while the local Ray head is up. Steady epoch = median period, first and last epoch left out.",
        "",
        "| path | steady epoch (s) | ratio to plain | of which train steps (s) | all epochs (s) |",
        "|---|---|---|---|---|",
        f"| plain PyTorch loop | {plain:.2f} | 1.00 | {plain:.2f} | {sum(rows['plain']):.1f} |",
        f"| in-process train_loop (embedding std, checkpoint each epoch) | {local:.2f} | {local / plain:.3f} |"
        f" {steady(rows['in_process_steps']):.2f} | {sum(rows['in_process']):.1f} |",
        f"| Ray Train, 1 worker (fit: + report, checkpoint upload) | {ray1:.2f} | {ray1 / plain:.3f} |"
        f" {steady(rows['ray_1_steps']):.2f} | {sum(rows['ray_1']):.1f} |",
        "",
        "Is it the worker process? The same train steps (views made beforehand) in this process and in Ray actors"
        " at Ray's default nice 15 (`RAY_worker_niceness`) and at nice 0, interleaved over 5 rounds of 40 steps"
        " (each round's median, then the median of rounds; `spread` is the rounds' max / min).",
        "",
        "| host | median step (ms) | ratio to this process | spread over rounds |",
        "|---|---|---|---|",
        *[f"| {name} | {1000 * statistics.median(s):.1f} | "
          f"{statistics.median(s) / statistics.median(rows['by_host']['this process (driver), nice 0']):.3f} |"
          f" {max(s) / min(s):.2f} |" for name, s in rows["by_host"].items()],
        "",
        "Fixed start-up + tear-down (wall time of a 2-epoch tiny run minus its epochs; Ray already running):",
        "",
        "| path | fixed cost (s) |",
        "|---|---|",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in fixed.items()],
        *[f"| bare TorchTrainer, {w} worker(s), one report (start {t['start']:.1f} + end {t['end']:.1f})"
          f" | {t['total']:.1f} |" for w, t in trivial.items()],
        f"| starting a local Ray head (Cluster + ray.init, dashboard on) | {rows['ray_start']:.1f} |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
