"""One Tune trial: one training run of the sweep's base config with the trial's overrides.

A one-worker trial runs the train loop right in the trial process and reports with
``ray.tune.report`` (no worker group to start: ~25 s saved per trial on a small machine).
A trial that asks for 2+ workers runs a Ray Train ``TorchTrainer`` inside the trial and
forwards its reports with ``TuneReportCallback`` (a PBT member: with its checkpoints, which PBT copies, see
:func:`_run_distributed_member`); the trial itself then holds only a sliver of a CPU. Either way the trial reports
``objective``: the held-out accuracy (or, with ``rankme``, the val RankMe, which needs no labels), or 0 for a
diverged or collapsed run, which also ends the trial early.

A search trial's params are the searcher's dotted overrides; a confirmation trial's params hold one
``confirm`` entry (candidate, seed, overrides; see :mod:`tuning.confirm`). :func:`trial_overrides`
reads either.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.tune import Checkpoint
from ray.util.queue import Empty, Queue

from ssl_train.config import TrainConfig, from_dict
from ssl_train.data import DatasetSplits
from ssl_train.status import Status
from ssl_train.training.distributed import build_trainer, checkpoint_state, fit_in_background
from ssl_train.training.loop import WorkerContext, in_process_device, train_loop
from tuning.population import EXPLOIT, SCHEDULE, continue_lineage, donor_of
from tuning.progress import quiet_worker_logs

OBJECTIVE = "objective"
CONFIRM_KEY = "confirm"  # the Tune param holding one confirmation run: candidate, seed and overrides (tuning.confirm)
TRIAL_CPU_WHEN_DISTRIBUTED = 0.01  # the trial only waits on its TorchTrainer; 0 is rejected by Tune
TRIAL_CHECKPOINTS = 1  # checkpoints a trial keeps (its newest): a resume needs no more, and a sweep has many trials


def trial_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """The dotted config overrides of a trial: the searcher's params, or a confirmation run's."""
    return params[CONFIRM_KEY]["overrides"] if CONFIRM_KEY in params else params


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_dir: str) -> TrainConfig:
    """The full config of a trial: base + its dotted overrides, writing into the trial dir."""
    return from_dict(base).replace({**trial_overrides(params), "output_dir": trial_dir})


def objective_value(metrics: dict[str, Any], objective: str, previous: float) -> float:
    """The number the searcher and scheduler see: 0 for a broken run, else the val score (kept when not measured).

    ``objective`` names the score (``knn_acc``, ``linear_acc``, or ``rankme``: Garrido et al. 2023, eq. 1, on the
    backbone's val features); the value is always the val split's.
    """
    if metrics.get("status") in (Status.DIVERGED, Status.COLLAPSED):
        return 0.0
    return float(metrics.get(f"val_{objective}", previous))


def run_trial(
    params: dict[str, Any], *, base_config: dict[str, Any], objective: str, splits: DatasetSplits | None = None,
    scheduled_keys: tuple[str, ...] = (),
) -> None:
    """The Tune function trainable (see ``tune.with_parameters`` in :mod:`tuning.sweep`).

    With ``scheduled_keys`` (a PBT member), a checkpoint restored from another member's is an exploit: the member
    continues that member's lineage with its own values of those keys from the checkpoint's epoch on
    (:func:`~tuning.population.continue_lineage`); every result carries the lineage's ``schedule`` (JSON) and the
    first one after an exploit says whom it copied (``exploit``), for MLflow.
    """
    quiet_worker_logs()
    trial_dir = tune.get_context().get_trial_dir()
    config = trial_config(base_config, params, trial_dir)
    if splits is not None and config.data != from_dict(base_config).data:
        splits = None  # the trial searches a data setting: load its own
    if config.scaling.max_workers > 1 and not scheduled_keys:
        _run_distributed(config, objective, trial_dir)
        return

    checkpoint = tune.get_checkpoint()
    state = checkpoint_state(checkpoint)
    notes: dict[str, str] = {}
    if scheduled_keys:
        config, notes = _member_config(config, state, checkpoint, scheduled_keys)
    report = TuneReport(objective, notes)
    if config.scaling.max_workers > 1:
        _run_distributed_member(config, report, trial_dir, checkpoint)
        return

    threads = IdleCores()

    def report_epoch(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        report(metrics, Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)
        threads.update()

    with tempfile.TemporaryDirectory(prefix="ssl-tune-trial-") as staging:
        # keep 1: tune.report has stored the checkpoint by the time the next one is written
        context = WorkerContext(device=in_process_device(config), checkpoint_dir=Path(staging), keep_checkpoints=1)
        train_loop(config, report_epoch, context, checkpoint=state, splits=splits)


class IdleCores:
    """The torch threads of a one-worker trial, set after each epoch: its own CPUs, plus the node's CPUs that no Ray
    task, actor or trial has held at this look and the one before (a lone last trial gets the core its finished
    neighbour freed; a trial that starts takes it back by the next epoch, and a slot that Tune refills at once is
    never counted). Only on one-node clusters: Ray counts free CPUs cluster-wide."""

    def __init__(self) -> None:
        self.own = torch.get_num_threads()  # Ray sets OMP_NUM_THREADS to the trial's CPUs
        self.free_before = 0

    def update(self) -> None:
        free = _free_node_cpus()
        threads = self.own + min(free, self.free_before)
        self.free_before = free
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)


def _free_node_cpus() -> int:
    """Whole CPUs that nothing holds on this one-node cluster; 0 on a cluster of several nodes."""
    if sum(node["Alive"] for node in ray.nodes()) != 1:
        return 0
    return int(ray.available_resources().get("CPU", 0.0))


class TuneReport:
    """Reports a trial's epoch to Tune: its metrics, the objective (the last one where an epoch has none) and a PBT
    member's notes (the exploit note once, with the first epoch after it)."""

    def __init__(self, objective: str, notes: dict[str, str]) -> None:
        self.objective, self.notes, self.last = objective, notes, 0.0

    def __call__(self, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None:
        self.last = objective_value(metrics, self.objective, self.last)
        result = {**metrics, OBJECTIVE: self.last, **self.notes}
        self.notes.pop(EXPLOIT, None)
        tune.report(result, checkpoint=checkpoint)


def _member_config(config: TrainConfig, state: dict[str, Any] | None, checkpoint: Checkpoint | None,
                   keys: tuple[str, ...]) -> tuple[TrainConfig, dict[str, str]]:
    """A PBT member's config (its lineage continued from a restored checkpoint) and the notes its results carry."""
    notes: dict[str, str] = {}
    if state is not None:
        previous = from_dict(state["config"])
        config = continue_lineage(previous, config, state["epoch"], keys)
        donor = donor_of(checkpoint.path)
        if donor != tune.get_context().get_trial_id():
            step = config.schedule[-1].set if config.schedule and config.schedule[-1].epoch == state["epoch"] else {}
            notes[EXPLOIT] = json.dumps({"from": donor, "epoch": state["epoch"], "set": step})
    notes[SCHEDULE] = json.dumps([vars(step) for step in config.schedule])
    return config, notes


def _run_distributed(config: TrainConfig, objective: str, trial_dir: str) -> None:
    """A multi-worker trial: a TorchTrainer whose reports reach Tune through TuneReportCallback."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):  # noqa: ANN001 - Ray's signature
            rank0 = dict(metrics[0])
            rank0[OBJECTIVE] = objective_value(rank0, objective, self.last)
            self.last = rank0[OBJECTIVE]
            super().after_report(run_context, [rank0], checkpoint)

    callback = ObjectiveReport()
    callback.last = 0.0
    trainer = build_trainer(
        config, name="train", storage=str(Path(trial_dir) / "ray-train"), callbacks=[callback],
        keep_checkpoints=TRIAL_CHECKPOINTS,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error


class _QueuedReports(UserCallback):
    """Ray Train's reports (rank 0's metrics, the checkpoint's path) into a queue that the Tune trial reads."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):  # noqa: ANN001 - Ray's signature
        self.queue.put((dict(metrics[0]), checkpoint.path if checkpoint else None))


def _run_distributed_member(config: TrainConfig, report: TuneReport, trial_dir: str, restored: Checkpoint | None,
                            ) -> None:
    """A multi-worker (elastic) PBT member: a TorchTrainer whose every epoch this trial reports to Tune with its
    checkpoint (PBT copies Tune's checkpoints; TuneReportCallback hands over a path only), the next epoch waiting
    until Tune has taken it (PBT pauses or copies a member between epochs).

    A restored member (its own checkpoint after a pause, or another's after an exploit) starts a Train run of its own,
    named after that checkpoint, from it: Train's runs resume only their own checkpoints.
    """
    reports, taken = (Queue(maxsize=1, actor_options={"num_cpus": 0}) for _ in range(2))
    name = "train" if restored is None else "from-" + "-".join(Path(restored.path).parts[-2:])
    trainer = build_trainer(
        config, name=name, storage=str(Path(trial_dir) / "ray-train"), callbacks=[_QueuedReports(reports)],
        resume_from=Path(restored.path) if restored else None, paced=taken,
    )
    runner, ended = fit_in_background(trainer)
    while runner.is_alive() or reports.qsize():
        try:
            metrics, path = reports.get(timeout=1.0)
        except Empty:
            continue
        report(metrics, path and Checkpoint(path))  # a paused member's process ends here, its Train run with it
        taken.put(True)
    if "error" in ended or ended["result"].error is not None:
        raise ended.get("error") or ended["result"].error
