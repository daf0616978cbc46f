"""Run one training from Python or ``ssl-tune train`` and write its outputs.

``train(config)`` runs the loop in this process when one worker is asked for (no Ray
start-up to pay) and under Ray Train otherwise. Either way the run directory ends up with
``config.yaml``, ``metrics.jsonl``, ``checkpoints/epoch_XXXX/`` and ``backbone.pt``::

    from ssl_train import load_config, train
    summary = train(load_config(overrides=["method=swav", "optim.epochs=5"]))
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_train.config import ConfigError, TrainConfig, load_config
from ssl_train.data import DatasetSplits
from ssl_train.export.embedding import EmbeddingModel
from ssl_train.methods.backbones import build_backbone
from ssl_train.status import Status
from ssl_train.training.checkpoint import latest_checkpoint, load_checkpoint
from ssl_train.training.loop import RunOutcome, WorkerContext, build_model, in_process_device, train_loop
from ssl_train.training.resources import check_in_process

BACKBONE_FILE = "backbone.pt"
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", BACKBONE_FILE)  # what a run leaves in its folder
# What torch.load and load_state_dict raise on a file that is not a state_dict of the backbone (garbage, an
# empty or truncated file, another model's weights).
_UNREADABLE = (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, TypeError, ValueError)


class BackboneError(ValueError):
    """A run's ``backbone.pt`` is not a readable backbone of its config."""


def previous_run(output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> list[Path]:
    """The files of a previous run in ``output_dir``, which ``overwrite`` may replace and ``resume`` continue.

    Raises :class:`ConfigError` (one line, naming the folder and both flags) when there are some and neither
    flag is given, or when both are: training over an old run would mix its checkpoints with the new ones.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run in the folder, or replace it")
    found = [Path(output_dir) / name for name in RUN_FILES if (Path(output_dir) / name).exists()]
    if found and not (resume or overwrite):
        raise ConfigError(f"run folder '{output_dir}' holds a previous run ({', '.join(p.name for p in found)}); "
                          "continue it with --resume, replace it with --overwrite, or choose another --output")
    return found


def export_backbone(checkpoint: str | Path, config: TrainConfig, destination: str | Path) -> Path:
    """Save the backbone of a checkpoint as a plain ``state_dict`` (torchvision key names)."""
    model = build_model(config)
    model.load_state_dict(load_checkpoint(checkpoint)["method"])
    destination = Path(destination)
    torch.save(model.backbone.state_dict(), destination)
    return destination


@contextmanager
def run_files(source: str | Path, tracking_uri: str | None = None) -> Iterator[Path]:
    """A folder holding a trained run's ``config.yaml`` and ``backbone.pt``: a run directory as it is, or
    those two artifacts of an MLflow run id or ``models:/NAME@alias`` URI, downloaded into a temporary
    folder that is removed on exit (also when the download fails)."""
    if Path(source).is_dir():
        yield Path(source)
        return
    from ssl_train.export.mlflow_model import fetch_run_files  # the MLflow edge, only when it is needed

    with tempfile.TemporaryDirectory(prefix="ssl-tune-") as folder:
        yield fetch_run_files(str(source), tracking_uri, Path(folder))


def _read_backbone(folder: Path, source: str | Path) -> nn.Module:
    """The backbone in ``folder`` (the files of ``source``), in eval mode; a BackboneError names ``source``."""
    config = load_config(folder / "config.yaml").backbone
    backbone = build_backbone(config)
    where = f"the {BACKBONE_FILE} of '{source}'"
    try:
        state = torch.load(folder / BACKBONE_FILE, map_location="cpu", weights_only=True)
    except _UNREADABLE as error:
        raise BackboneError(f"{where} is not a readable backbone: not a PyTorch weights file "
                            f"({type(error).__name__})") from None
    try:
        backbone.load_state_dict(state)
    except _UNREADABLE as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise BackboneError(f"{where} is not a readable backbone: not a state_dict of its config's "
                            f"backbone.name={config.name!r} ({reason})") from None
    return backbone.eval()


def load_backbone(source: str | Path, tracking_uri: str | None = None) -> nn.Module:
    """The trained backbone of a run directory, an MLflow run id or ``models:/NAME@best``, in eval mode."""
    with run_files(source, tracking_uri) as folder:
        return _read_backbone(folder, source)


def load_embedding_model(source: str | Path, tracking_uri: str | None = None) -> EmbeddingModel:
    """Raw uint8 pixels in, embeddings out: the backbone with its run's preprocessing (image size, normalisation)."""
    with run_files(source, tracking_uri) as folder:
        return EmbeddingModel(_read_backbone(folder, source), load_config(folder / "config.yaml").data.image_size)


def runs_in_process(config: TrainConfig, address: str | None = None) -> bool:
    """A run of one worker with no cluster address trains in this process (no Ray)."""
    return config.scaling.max_workers == 1 and address is None


def check_device(config: TrainConfig, address: str | None = None) -> None:
    """Refuse GPUs (``scaling.use_gpu``) for a run in this process where none are visible: it would train on
    the CPU. A run under Ray is checked against the cluster (:func:`ssl_train.training.distributed.check_capacity`)."""
    if runs_in_process(config, address):
        check_in_process(config, torch.cuda.device_count())


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    show_progress: bool = False,
    address: str | None = None,
    splits: DatasetSplits | None = None,
) -> RunOutcome:
    """Train one model with one config; ``resume`` continues from the run directory's last checkpoint.

    A run directory that holds a previous run is refused (:func:`previous_run`) unless ``resume`` continues
    it or ``overwrite`` first deletes its files. ``splits`` (already loaded data) saves loading it again for
    an in-process run.
    """
    output_dir = Path(config.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    old_files = previous_run(output_dir, resume, overwrite)
    check_device(config, address)
    start_from = latest_checkpoint(checkpoint_dir) if resume else None
    if resume and start_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint under '{checkpoint_dir}'; run without --resume to start")
    for path in old_files if overwrite else []:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save(output_dir / "config.yaml")
    metrics_file = output_dir / "metrics.jsonl"

    def record(metrics: dict[str, Any], _checkpoint: Path | None = None) -> None:
        with metrics_file.open("a") as stream:
            stream.write(json.dumps(metrics) + "\n")
        if on_epoch is not None:
            on_epoch(metrics)

    if not runs_in_process(config, address):
        from ssl_train.training.distributed import fit

        outcome = fit(config, record, resume_from=start_from, address=address)
    else:
        context = WorkerContext(
            device=in_process_device(config), checkpoint_dir=checkpoint_dir, show_progress=show_progress
        )
        outcome = train_loop(config, record, context, checkpoint=start_from, splits=splits)
    outcome.output_dir = output_dir
    if outcome.status == Status.FINISHED and outcome.checkpoint is not None:
        outcome.backbone_path = export_backbone(outcome.checkpoint, config, output_dir / BACKBONE_FILE)
    return outcome
