"""What a run's workers ask for (CPUs and GPUs each) against what a Ray cluster or this machine has.

One check and one message for both: ``ssl-tune tune`` and multi-worker runs compare with the Ray cluster
(:func:`ssl_train.training.distributed.check_capacity`), an in-process ``ssl-tune train`` with this machine's GPUs.
No Ray import here, so the in-process path stays light.
"""

from __future__ import annotations

import os
from pathlib import Path

from ssl_train.config import ConfigError, TrainConfig


def worker_resources(config: TrainConfig) -> dict[str, float]:
    """The resources of one worker: its CPUs, and its GPUs when ``scaling.use_gpu``."""
    s = config.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}


def shortfall(config: TrainConfig, largest: dict[str, float], total: dict[str, float], where: str,
              extra_cpus: float = 0.0) -> tuple[str, str] | None:
    """The first resource ``scaling.min_workers`` workers (plus ``extra_cpus``) need more of than one node
    (``largest``) or ``where`` (``total``) holds: (the problem in words, the config field to lower); None
    when they fit."""
    s = config.scaling
    for key, amount in worker_resources(config).items():
        extra = extra_cpus if key == "CPU" else 0.0
        needed = s.min_workers * amount + extra
        if amount <= largest.get(key, 0.0) and needed <= total.get(key, 0.0):
            continue
        field = "scaling.cpus_per_worker" if key == "CPU" else "scaling.gpus_per_worker"
        problem = (
            f"scaling.min_workers={s.min_workers} workers x {field}={amount:g}"
            + (f" + {extra:g} for Ray Data's decode tasks (data.streaming)" if extra else "")
            + f" need {needed:g} {key} (at most {largest.get(key, 0.0):g} on one node); "
            f"{where} has {total.get(key, 0.0):g} {key}"
        )
        return problem, field
    return None


def refusal(problem: str, field: str) -> ConfigError:
    """The error for a run that cannot be placed, with the ways out."""
    return ConfigError(f"{problem}; ask for fewer workers (--workers), lower {field}, or add nodes")


def check_in_process(config: TrainConfig, gpus: int) -> None:
    """Refuse a run in this process that asks for GPUs (``--gpus-per-worker``) where ``gpus`` are fewer:
    it would train on the CPU. Its CPUs are not reserved, so they always fit."""
    machine = {"CPU": config.scaling.cpus_per_worker, "GPU": float(gpus)}
    found = shortfall(config, machine, machine, "this machine")
    if found is not None:
        raise refusal(*found)


def local_gpu_count(driver: Path = Path("/proc/driver/nvidia/gpus")) -> int:
    """This machine's NVIDIA GPUs, without importing torch (seconds): those ``CUDA_VISIBLE_DEVICES`` names when it is
    set, else the driver's entries (none where there is no NVIDIA driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([device for device in visible.split(",") if device.strip() and device.strip() != "-1"])
    return len(list(driver.iterdir())) if driver.is_dir() else 0
