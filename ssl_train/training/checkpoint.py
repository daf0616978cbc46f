"""Complete, atomically written training checkpoints.

A checkpoint is a directory holding one ``state.pt``: the method's state (online and
target networks, prototypes, queue), optimizer, lr schedule, epoch, step, RNG states and
the metric history. It is written to a temporary directory and renamed into place, so a
crash while writing never leaves a checkpoint that fails to load. Loading uses
``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
PREFIX = "epoch_"


def rng_state() -> dict[str, Any]:
    """The RNG states that drive augmentation and sampling (torch CPU/CUDA, Python)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` needs tuples; a round trip may hand back lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(state: dict[str, Any], directory: str | Path, epoch: int, keep: int = 2) -> Path:
    """Write ``state`` as ``directory/epoch_XXXX/state.pt`` atomically; keep it and the ``keep - 1`` newest
    older epochs (``keep <= 0``: keep all). A checkpoint of a later epoch than ``epoch`` is never deleted."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{epoch:04d}"
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    torch.save(state, staging / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    older = [p for p in list_checkpoints(directory) if checkpoint_epoch(p) < epoch]
    for old in older[: max(len(older) - (keep - 1), 0)] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_epoch(path: str | Path) -> int:
    """``.../epoch_0012`` -> 12."""
    return int(Path(path).name.removeprefix(PREFIX))


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest epoch first (staging dirs are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(f"{PREFIX}*") if p.name.removeprefix(PREFIX).isdigit()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_epoch)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint directory (or its ``state.pt``) on the CPU, with ``weights_only=True``."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at '{path}' (expected a directory holding {STATE_FILE})")
    return torch.load(file, map_location="cpu", weights_only=True)
