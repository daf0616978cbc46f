"""Finishing a sweep: the winner (confirmed, or the search's best), its baselines, config, tables, plots and
weights in MLflow, and the checkpoints nobody needs deleted."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
from mlflow.entities import Metric
from ray import tune
from ray.tune import Checkpoint

from ssl_train.config import TrainConfig
from ssl_train.data import load_splits
from ssl_train.status import Status
from tuning.confirm import DEFAULT_CANDIDATE, Confirmation, Margin
from tuning.settings import STUDY_FILE, SweepSettings, first_round_seeds, sweep_path
from tuning.trial import OBJECTIVE


@dataclass
class SweepOutcome:
    name: str
    path: Path
    table_text: str  # the search trials, best val first
    best_config_path: Path  # the confirmed winner (the best search trial with --no-confirm)
    confirmation_text: str | None  # per-config test mean ± std, baselines, margin and verdict (no labels: val RankMe)
    margin: Margin | None  # None without confirmation, or without labels (no accuracy measured)
    parent_run_id: str
    model_uri: str | None  # the winner's MLflow Model (models:/NAME/VERSION when registered)
    change: str = "nothing"  # what the winner changes in the start, in words (tuning.report.recipe_change)
    dropped_checkpoints: int = 0  # trials whose checkpoints were deleted (all but those logged to MLflow)

    def disk_line(self) -> str:
        """The sweep folder's size, and which checkpoints were deleted to keep it small."""
        dropped = (f"; deleted the checkpoints of {self.dropped_checkpoints} trials whose weights are not in MLflow "
                   "(--keep-checkpoints keeps them)" if self.dropped_checkpoints else "")
        return f"sweep folder {self.path}: {folder_size(self.path) / 1e6:.1f} MB{dropped}"


BASELINE_KEYS = ("raw_pixels", "random_init")  # the MLflow names of what baselines() returns, in its order


def baselines(base: TrainConfig, splits: Any, seeds: int, objective: str) -> dict[str, tuple[float, float]]:
    """What SSL must beat, on the same test split: kNN on raw pixels, and the backbone at random init (S seeds),
    its features computed as the runs' are (bf16 where they train in bf16)."""
    import torch

    from ssl_train.evaluation.evaluate import evaluate_backbone
    from ssl_train.evaluation.knn import knn_protocol, pixel_knn_accuracy
    from ssl_train.training.loop import build_model, uses_bf16

    protocol = knn_protocol(base.eval, splits.eval_train.labels)
    bf16 = uses_bf16(base, torch.device("cpu"))
    random_init = [
        evaluate_backbone(build_model(base.replace({"seed": base.seed + index})).backbone, splits, base.eval,
                          split="test", bf16=bf16)[f"test_{objective}"]
        for index in range(seeds)
    ]
    return {f"raw pixels ({protocol})": (pixel_knn_accuracy(splits, base.eval), 0.0),
            f"random-init backbone ({objective})": (float(np.mean(random_init)), float(np.std(random_init, ddof=1))
                                                     if seeds > 1 else 0.0)}


@dataclass
class _Winner:
    """The sweep's winner and what finishing keeps of it: config, the runs whose weights go to MLflow, the scores
    its MLflow Model is tagged with, and the confirmation's text, margin and baselines where it was confirmed."""

    config: TrainConfig
    keep: pd.DataFrame  # columns trial, run_id: the runs whose backbone.pt is logged, the first as the Model
    weights: dict[str, Checkpoint]
    scores: dict[str, str]
    artifacts: list[Path] = field(default_factory=list)
    confirmation: Confirmation | None = None
    text: str | None = None
    margin: Margin | None = None
    reference: dict[str, tuple[float, float]] = field(default_factory=dict)


def finish_sweep(
    settings: SweepSettings, search: list[tune.Result], confirm: list[tune.Result] | None = None
) -> SweepOutcome:
    """After the last trial: the winner's config YAML, tables and plots on the parent run, the winner's weights."""
    from tuning.report import format_table, load_report, load_sweep_confirmation, recipe_change

    path = sweep_path(settings)
    tracker = _tracker(settings, path)
    report = load_report(settings.tracking_uri, settings.name, settings.experiment)
    tracker.parent_id = report.parent_id
    if _close_unfinished(tracker, report, settings):
        report = load_report(settings.tracking_uri, settings.name, settings.experiment)
    _check_scored(report.table, settings)
    loaded = load_sweep_confirmation(report, settings)
    failed_text = None
    if loaded is not None and settings.confirm and loaded[0].summary().empty:
        failed_text = loaded[0].format({})  # every confirmation run failed: say so; the search's best is the winner
        loaded = None
    if loaded is not None and settings.confirm:
        winner = _confirmed_winner(settings, tracker.client, report.parent_id, loaded, confirm, path)
    else:
        winner = _Winner(report.configs[report.best["run_id"]],
                         report.table[report.table["status"] == Status.FINISHED].head(settings.keep_best),
                         _checkpoints(search), {"sweep": settings.name, "stage": "search",
                                                f"val_{settings.objective}": f"{float(report.best[OBJECTIVE]):.4f}"},
                         text=failed_text)
    best_config_path, model_uri = _log_winner(settings, tracker.client, report, winner, path)
    dropped = 0 if settings.keep_checkpoints else drop_checkpoints(
        [*search, *(confirm or [])], keep=set(winner.keep["trial"]))
    return SweepOutcome(
        name=settings.name, path=path, table_text=format_table(report), best_config_path=best_config_path,
        confirmation_text=winner.text, margin=winner.margin, parent_run_id=report.parent_id, model_uri=model_uri,
        change=recipe_change(settings.base_config(), winner.config, report.space.searched_keys()),
        dropped_checkpoints=dropped,
    )


class NothingScored(RuntimeError):
    """A sweep ended before any search trial reported a score: there is no best config."""


def _close_unfinished(tracker: Any, report: Any, settings: SweepSettings) -> int:
    """Close the search trials still marked running when the sweep ended (its time budget stopped them mid-epoch;
    Tune tells no callback); returns how many."""
    if report.table.empty:
        return 0
    running = report.table[report.table["status"] == Status.RUNNING]
    for _, row in running.iterrows():
        why = (f"stopped by the time budget of {settings.time_budget_s:.0f} s" if settings.time_budget_s else
               "stopped when the sweep ended")
        tracker.end_run(row["run_id"], Status.BUDGET, f"{why} after epoch {row['epochs']}")
    return len(running)


def _check_scored(table: pd.DataFrame, settings: SweepSettings) -> None:
    """Refuse to call any config best when no search trial reported a score, in one line that says what to do."""
    if not table.empty and (table["epochs"] > 0).any():
        return
    budget = f" by the time budget of {settings.time_budget_s:.0f} s" if settings.time_budget_s else ""
    raise NothingScored(
        f"no search trial of sweep {settings.name} reported a score before the sweep ended ({len(table)} trials "
        f"started, all stopped at epoch 0{budget}), so no config can be called best; raise --time-budget, or make "
        "the trials smaller (--epochs, data.image_size, fewer images); `ssl-tune tune --resume "
        f"{settings.name}` continues the sweep")


def _tracker(settings: SweepSettings, path: Path) -> Any:
    """The sweep's MLflow tracker; an unreachable server says how to finish the sweep once it is back."""
    from tuning.tracking import SweepTracker, TrackingError

    try:
        return SweepTracker(settings.tracking_uri, settings.name, settings.experiment)  # checks the server
    except TrackingError as error:
        raise TrackingError(
            f"{error}. The sweep's results are kept in {path}; once the server is back, "
            f"`ssl-tune tune --resume {settings.name}` logs what is missing and writes the report"
        ) from None


def _confirmed_winner(settings: SweepSettings, client: Any, parent_id: str, loaded: tuple[Confirmation, dict],
                      confirm: list[tune.Result] | None, path: Path) -> _Winner:
    """The confirmation's winner; its margin over the default, the baselines and the scores go to the parent run."""
    confirmation, configs = loaded
    base = settings.base_config()
    measured = confirmation.test_metric
    reference = {}
    if confirmation.accuracy_measured:  # data with no labels has no test split: nothing to compare with
        splits = load_splits(base.replace({"data.leak_check": False}).data)  # checked and logged at the start
        reference = baselines(base, splits, first_round_seeds(settings), measured)
    margin = confirmation.margin()
    summary = confirmation.summary().set_index("candidate")
    test_scores = {} if margin is None else {
        "confirm_margin": margin.difference, "confirm_margin_low": margin.low, "confirm_margin_high": margin.high,
        f"winner_test_{measured}": summary.loc[confirmation.winner, "test_mean"],
        f"default_test_{measured}": summary.loc[DEFAULT_CANDIDATE, "test_mean"],
        **{f"baseline_{name}_test": mean for name, (mean, _) in zip(BASELINE_KEYS, reference.values(), strict=True)},
    }
    client.log_batch(parent_id, metrics=[
        Metric(key, float(value), int(time.time() * 1000), 0) for key, value in {
            f"winner_val_{settings.objective}": summary.loc[confirmation.winner, "val_mean"], **test_scores,
        }.items() if np.isfinite(value)])
    client.set_tag(parent_id, "ssl_tune.winner", confirmation.winner)
    if margin is not None:
        client.set_tag(parent_id, "ssl_tune.margin_interval", margin.method)
    confirmation.runs.to_csv(path / "confirmation.csv", index=False)
    scores = {"sweep": settings.name, "stage": "confirm",
              f"val_{settings.objective}": f"{summary.loc[confirmation.winner, 'val_mean']:.4f}",
              **({} if margin is None else
                 {f"test_{measured}": f"{summary.loc[confirmation.winner, 'test_mean']:.4f}"})}
    return _Winner(configs[confirmation.winner].replace({"seed": base.seed}),
                   confirmation.runs[confirmation.runs["candidate"] == confirmation.winner],
                   _checkpoints(confirm or []), scores, [path / "confirmation.csv"], confirmation,
                   confirmation.format(reference), margin, reference)


def _log_winner(
    settings: SweepSettings, client: Any, report: Any, winner: _Winner, path: Path
) -> tuple[Path, str | None]:
    """``best_config.yaml``, tables, study and plots on the parent run, the kept runs' weights and the winner's
    MLflow Model; the parent run is closed. Returns the config's path and the Model's URI (None without weights)."""
    from tuning.report import load_study, write_plots, write_tables

    # A re-run of the winner writes to a run directory of its own (not into the sweep) and reports test.
    best_config_path = winner.config.replace({"output_dir": TrainConfig.output_dir, "eval.test_at_end": True}).save(
        path / "best_config.yaml")
    study = load_study(report, settings.tracking_uri)
    artifacts = [*winner.artifacts, best_config_path, *write_tables(report, path), path / STUDY_FILE,
                 *write_plots(study, path / "plots", winner.confirmation, winner.reference)]
    artifacts += _schedule_plot(report, winner.config, path / "plots" / "schedule.png")
    for artifact in artifacts:
        if artifact.exists():
            client.log_artifact(report.parent_id, str(artifact), "plots" if artifact.parent.name == "plots" else None)
    logged = _log_backbones(client, winner.keep, winner.weights, winner.config)
    model_uri = None
    if logged:
        from ssl_train.export.mlflow_model import log_embedding_model

        run_id, backbone = logged[0]
        model_uri = log_embedding_model(settings.tracking_uri, run_id, backbone, winner.config, settings.register,
                                        winner.scores)
    client.log_metric(report.parent_id, f"best_search_val_{settings.objective}", float(report.best[OBJECTIVE]))
    client.set_terminated(report.parent_id, "FINISHED")
    return best_config_path, model_uri


def _schedule_plot(report: Any, winner: TrainConfig, path: Path) -> list[Path]:
    """A PBT search's schedule against the epoch: the winner's, or where the start won, the best search member's that
    has one; none for a search without schedules."""
    from tuning.population import plot_schedule

    path.parent.mkdir(parents=True, exist_ok=True)
    if winner.schedule:
        return [plot_schedule(winner, report.space.searched_keys(), path)]
    for _, row in report.table.iterrows():
        if report.configs[row["run_id"]].schedule:
            return [plot_schedule(report.configs[row["run_id"]], report.space.searched_keys(), path,
                                  f"the best scheduled search member's (trial {row['trial']})")]
    return []


def drop_checkpoints(results: list[tune.Result], keep: set[str]) -> int:
    """Delete every checkpoint of the trials not in ``keep`` (trial ids): Tune's, and a multi-worker trial's
    Ray Train ones, wherever the storage is. Their configs and metrics stay in MLflow; returns how many
    trials had some."""
    trials = 0
    for result in results:
        if (result.metrics or {}).get("trial_id") in keep:
            continue
        selector = pafs.FileSelector(result.path, recursive=True, allow_not_found=True)
        found = sorted(info.path for info in result.filesystem.get_file_info(selector)
                       if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"))
        outermost = [path for path in found if not any(path.startswith(f"{other}/") for other in found)]
        for path in outermost:
            result.filesystem.delete_dir(path)
        trials += bool(outermost)
    return trials


def folder_size(path: Path) -> int:
    """Bytes in the files under ``path``."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _checkpoints(results: list[tune.Result] | tune.ResultGrid) -> dict[str, Checkpoint]:
    """Each trial's last checkpoint by trial id. A 2+ worker trial reports through Ray's TuneReportCallback,
    which forwards only the checkpoint's path (its ``result.checkpoint`` is None): build it from the path."""
    found = {}
    for result in results:
        checkpoint = result.checkpoint
        if checkpoint is None and result.metrics.get("checkpoint_path"):
            checkpoint = Checkpoint(result.metrics["checkpoint_path"])
        if checkpoint is not None:
            found[result.metrics.get("trial_id")] = checkpoint
    return found


def _exists(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint's folder is still there (an earlier end of the sweep may have deleted it)."""
    return checkpoint.filesystem.get_file_info(checkpoint.path).type != pafs.FileType.NotFound


def _log_backbones(client: Any, rows: Any, checkpoints: dict[str, Checkpoint],
                   config: TrainConfig) -> list[tuple[str, Any]]:
    """``backbone.pt`` of each run in ``rows`` (columns trial, run_id) whose Tune checkpoint is at hand;
    returns (run id, backbone) of those logged."""
    from ssl_train.training.run import export_backbone, load_backbone

    logged = []
    for _, row in rows.iterrows():
        checkpoint = checkpoints.get(row["trial"])
        if checkpoint is not None and _exists(checkpoint):
            with checkpoint.as_directory() as directory, tempfile.TemporaryDirectory() as staging:
                weights = export_backbone(directory, config, Path(staging) / "backbone.pt")
                client.log_artifact(row["run_id"], str(weights))
                config.save(Path(staging) / "config.yaml")
                logged.append((row["run_id"], load_backbone(staging)))
    return logged
