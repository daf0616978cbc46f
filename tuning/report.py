"""A sweep read back from MLflow: the trials table, the best config, and the plots a person looks at.

Everything here reads MLflow only, so ``ssl-tune report`` works on any sweep in a
tracking store, including one that ran on another machine.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from search_spaces import SearchSpace, load_space  # noqa: E402
from ssl_train.config import TrainConfig  # noqa: E402
from ssl_train.status import Status  # noqa: E402
from tuning.confirm import Confirmation, metric_on_test  # noqa: E402
from tuning.outcome import RANKED_BY  # noqa: E402
from tuning.population import POPULATION_SEARCHERS  # noqa: E402
from tuning.settings import SweepSettings, confirmation_looks  # noqa: E402
from tuning.tracking import (  # noqa: E402
    CANDIDATE_TAG,
    DEFAULT_EXPERIMENT,
    DEFAULT_TAG,
    REASON_TAG,
    SCHEDULE_TAG,
    STAGE_TAG,
    STATUS_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    TUNE_EXPERIMENT_TAG,
)
from tuning.trial import OBJECTIVE  # noqa: E402

OBJECTIVE_SE = "objective_se"  # the search table's column: the val objective's standard error (bootstrap over groups)
NOISE_Z = 1.96  # two scores closer than this many standard errors of their difference are within noise

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class SweepReport:
    """The search trials of one sweep as MLflow holds them (their objective: the val split's accuracy)."""

    name: str
    parent_id: str
    space: SearchSpace
    table: pd.DataFrame  # one row per trial, best first
    configs: dict[str, TrainConfig]  # run_id -> the trial's full config
    parent_params: dict[str, str]  # the sweep's settings (sweep.*)

    @property
    def best(self) -> pd.Series:
        return self.table.iloc[0]


def config_from_params(params: dict[str, str]) -> TrainConfig:
    """A trial's config from its MLflow params (the flattened config, every value as text)."""
    values = {key: None if text == "None" else yaml.safe_load(text) for key, text in params.items()}
    return TrainConfig().replace(values)


def find_parent(client: MlflowClient, experiment_id: str, sweep: str | None) -> Any:
    """The sweep's parent run by name, or the newest sweep when ``sweep`` is None."""
    where = f"tags.`{TRIAL_TAG}` = 'sweep'" + (f" and tags.`{SWEEP_TAG}` = '{sweep}'" if sweep else "")
    runs = client.search_runs([experiment_id], where, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise LookupError(f"no sweep {sweep!r} in the MLflow experiment; `ssl-tune report` lists what exists")
    return runs[0]


def load_report(tracking_uri: str, sweep: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> SweepReport:
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no MLflow experiment '{experiment}' at {tracking_uri}")
    parent = find_parent(client, found.experiment_id, sweep)
    name = parent.data.tags[SWEEP_TAG]
    space = load_space(parent.data.params["sweep.space"])
    children = _stage_runs(client, found.experiment_id, name, "search")
    objective = parent.data.params.get("sweep.objective", "knn_acc")
    rows, configs = [], {}
    for run in children:
        run_id = run.info.run_id
        configs[run_id] = config_from_params(run.data.params)
        flat = configs[run_id].flat()
        learned = {}
        if SCHEDULE_TAG in run.data.tags:  # a PBT member: its start values (the params) and the schedule it learned
            learned = {"schedule": json.loads(run.data.tags[SCHEDULE_TAG])}
            configs[run_id] = configs[run_id].replace(learned)
        rows.append({
            "trial": run.data.tags[TRIAL_TAG],
            OBJECTIVE: run.data.metrics.get(OBJECTIVE, 0.0),
            OBJECTIVE_SE: run.data.metrics.get(f"val_{objective}_se", float("nan")),
            "val_knn_acc": run.data.metrics.get("val_knn_acc"),
            "epochs": int(run.data.metrics.get("epoch", 0)),
            "status": run.data.tags.get(STATUS_TAG, Status.RUNNING),
            "reason": run.data.tags.get(REASON_TAG, ""),
            "is_default": run.data.tags.get(DEFAULT_TAG) == "true",
            **{key: flat[key] for key in space.searched_keys() if key in flat},
            **learned,
            "run_id": run_id,
            "started": run.info.start_time,
        })
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values([OBJECTIVE, "epochs"], ascending=False).reset_index(drop=True)
    return SweepReport(name, parent.info.run_id, space, table, configs, dict(parent.data.params))


def _trial_count(confirm_experiment: str) -> int:
    """``confirm-12`` (and its sequential rounds, ``confirm-12-seeds5``) -> 12."""
    parts = confirm_experiment.split("-")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _stage_runs(client: MlflowClient, experiment_id: str, sweep: str, stage: str) -> list[Any]:
    where = f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{STAGE_TAG}` = '{stage}'"
    return client.search_runs([experiment_id], where, max_results=5000)


def load_confirmation(report: SweepReport, tracking_uri: str, objective: str, experiment: str = DEFAULT_EXPERIMENT,
                      looks: tuple[int, ...] | None = None, min_effect: float = 0.0,
                      ) -> tuple[Confirmation, dict[str, TrainConfig]] | None:
    """The latest confirmation of a sweep (None when it has none) and each candidate's config: val ``objective`` and
    test :func:`~tuning.confirm.test_metric` of each run; ``looks`` for ``--confirm-seeds auto``.

    A sweep extended after it was confirmed is confirmed again (Tune experiment ``confirm-<trials>``, and its
    sequential rounds ``confirm-<trials>-seeds<n>``); only the runs of the confirmation of the most search trials
    count.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = _stage_runs(client, client.get_experiment_by_name(experiment).experiment_id, report.name, "confirm")
    if runs:
        latest = max(_trial_count(r.data.tags.get(TUNE_EXPERIMENT_TAG, "")) for r in runs)
        runs = [r for r in runs if _trial_count(r.data.tags.get(TUNE_EXPERIMENT_TAG, "")) == latest]
    if not runs:
        return None
    rows, configs = [], {}
    for run in runs:
        candidate = run.data.tags[CANDIDATE_TAG]
        config = config_from_params(run.data.params)
        configs.setdefault(candidate, config)
        rows.append({
            "candidate": candidate,
            "seed": config.seed,
            "val": run.data.metrics.get(f"val_{objective}"),
            "test": run.data.metrics.get(f"test_{metric_on_test(objective)}"),  # None: not measured (no labels)
            "status": run.data.tags.get(STATUS_TAG, Status.RUNNING),
            "trial": run.data.tags[TRIAL_TAG],
            "run_id": run.info.run_id,
        })
    return Confirmation(pd.DataFrame(rows), objective, looks, min_effect), configs


def load_sweep_confirmation(report: SweepReport,
                            settings: SweepSettings) -> tuple[Confirmation, dict[str, TrainConfig]] | None:
    """:func:`load_confirmation` for the sweep of ``settings``: its objective, experiment and ``--confirm-seeds``
    design (fixed, or the looks and minimum effect of ``auto``)."""
    return load_confirmation(report, settings.tracking_uri, settings.objective, settings.experiment,
                             confirmation_looks(settings.confirm_seeds, settings.max_confirm_seeds),
                             settings.min_effect)


def format_table(report: SweepReport, top: int = 10) -> str:
    """The ``top`` search trials in the order that ranks them, the ranking value's column named for what it is,
    its standard error (``±SE``), the trials within noise of the best marked ``~best``, and a line when the whole
    search lies within the objective's noise (:func:`resolution_line`)."""
    columns = ["trial", OBJECTIVE, OBJECTIVE_SE, "epochs", "status", *report.space.searched_keys(), "schedule"]
    shown = report.table[[c for c in columns if c in report.table]].head(top).copy()
    if "schedule" in shown:  # a PBT search: every member starts at the same values; what differs is its schedule
        keys = report.space.searched_keys()
        shown = shown.drop(columns=keys)
        shown["schedule"] = [", ".join(_schedule_changes(report.configs[run], keys)) or "nothing"
                             for run in report.table["run_id"].head(top)]
    if OBJECTIVE_SE in shown:
        shown.insert(1, "", np.where(within_noise_of_best(shown), "~best", ""))
    ranked_by = RANKED_BY.format(objective=report.parent_params.get("sweep.objective", "knn_acc"))
    text = shown.rename(columns={OBJECTIVE: ranked_by, OBJECTIVE_SE: "±SE"}).to_string(
        index=False, float_format=lambda v: f"{v:.4g}")
    line = resolution_line(report.table)
    return text + (f"\n{line}" if line else "")


def within_noise_of_best(table: pd.DataFrame, z: float = NOISE_Z) -> np.ndarray:
    """Per trial (rows best first): whether its objective lies within ``z`` standard errors of the best's
    difference from it, ``sqrt(se_best^2 + se^2)`` (unpaired: conservative, as trials share the val images)."""
    values, errors = table[OBJECTIVE].to_numpy(float), table[OBJECTIVE_SE].to_numpy(float)
    if not len(values) or not np.isfinite(errors[0]):
        return np.zeros(len(values), dtype=bool)
    return (values[0] - values) <= z * np.sqrt(errors[0] ** 2 + np.nan_to_num(errors) ** 2)


def resolution_line(table: pd.DataFrame) -> str | None:
    """One line when every finished search trial lies within noise of the best: the recipes tried differ by less
    than this val split can measure, and what would help."""
    finished = table[table["status"] == Status.FINISHED].sort_values(OBJECTIVE, ascending=False)
    if len(finished) < 2 or OBJECTIVE_SE not in finished or not np.isfinite(finished[OBJECTIVE_SE]).any():
        return None
    if not within_noise_of_best(finished).all():
        return None
    points = 100 * NOISE_Z * float(np.nanmedian(finished[OBJECTIVE_SE]))
    return (f"the {len(finished)} recipes tried differ by less than this val split can measure (±{points:.1f} "
            "points at 95 %): more val groups (data.val_fraction), a smaller space with stronger knobs, or more "
            "epochs would tell them apart")


SHORT_NAMES = {"crop_scale": "crop", "tau_base": "tau", "strength": "augmentation strength"}


def recipe_change(start: TrainConfig, winner: TrainConfig, keys: list[str]) -> str:
    """What the winner changes in the start, in words, over the searched ``keys``: ``flips off, crop 0.4-1 instead
    of 0.08-1, lr 0.004 instead of 0.002``; ``nothing`` when they agree."""
    return ", ".join(_changes(start.flat(), winner.flat(), keys) + _schedule_changes(winner, keys)) or "nothing"


def _schedule_changes(config: TrainConfig, keys: list[str]) -> list[str]:
    """Each step of ``config``'s schedule in words: ``after epoch 2: flips off``."""
    changes = []
    for step in config.schedule:
        during = _changes(config.at_epoch(step.epoch - 1).flat(), config.at_epoch(step.epoch).flat(), keys)
        changes.append(f"after epoch {step.epoch}: {', '.join(during) or 'the same'}")
    return changes


def _changes(before: dict[str, Any], after: dict[str, Any], keys: list[str]) -> list[str]:
    changes = []
    for key in keys:
        old, new = before.get(key), after.get(key)
        if old == new or (isinstance(old, float) and isinstance(new, float) and math.isclose(old, new, rel_tol=1e-3)):
            continue
        if key == "augment.flip_p":
            changes.append("flips off" if not new else f"flips on (p={new:g})")
        else:
            name = key.rpartition(".")[2]
            changes.append(f"{SHORT_NAMES.get(name, name)} {_words(new)} instead of {_words(old)}")
    return changes


def _words(value: Any) -> str:
    if isinstance(value, list | tuple) and len(value) == 2:
        return f"{value[0]:g}-{value[1]:g}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def load_study(report: SweepReport, tracking_uri: str) -> optuna.Study | None:
    """The sweep's persisted Optuna study: ``<storage>/<sweep>/optuna.db``, or the copy on the parent run; None for
    a PBT search, which has none."""
    if report.parent_params.get("sweep.searcher") in POPULATION_SEARCHERS:
        return None
    local = Path(report.parent_params.get("sweep.storage", "runs/sweeps")).expanduser() / report.name / "optuna.db"
    if not local.is_file():
        try:
            local = Path(MlflowClient(tracking_uri).download_artifacts(report.parent_id, "optuna.db"))
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            return None
    return optuna.load_study(study_name=report.name, storage=f"sqlite:///{local.resolve()}")


def write_plots(
    study: optuna.Study | None,
    folder: str | Path,
    confirmation: Confirmation | None = None,
    baselines: dict[str, tuple[float, float]] | None = None,
) -> list[Path]:
    """Optuna's own plots of the search (history, importances, parallel coordinates, intermediate values)
    and the confirmation plot (test accuracy per config over seeds, with the baselines)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE] if study else []
    if study is not None and study.trials:
        vis = optuna.visualization.matplotlib
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        plots = [("optimization_history.png", lambda: vis.plot_optimization_history(study)),
                 ("intermediate_values.png", lambda: vis.plot_intermediate_values(study))]
        if len(complete) >= 2:
            plots += [("parallel_coordinates.png", lambda: vis.plot_parallel_coordinate(study)),
                      ("param_importances.png", lambda: _titled(
                          vis.plot_param_importances(study, evaluator=evaluator),
                          f"importances on {len(complete)} COMPLETE trials (fANOVA, seed 0)"))]
        for name, plot in plots:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                try:
                    axes = plot()
                except (RuntimeError, ValueError):
                    continue  # too few distinct trials for this plot
            written.append(_save(_figure_of(axes), folder / name))
    if confirmation is not None:
        written.append(_confirmation_plot(confirmation, baselines or {}, folder / "confirmation.png"))
    return written


def _titled(axes: Any, title: str) -> Any:
    axes.set_title(title)
    return axes


def _confirmation_plot(confirmation: Confirmation, baselines: dict[str, tuple[float, float]], path: Path) -> Path:
    """Test accuracy per config (dots: seeds), the baselines as lines; without labels, val RankMe per config."""
    summary = confirmation.summary()
    split, metric = (("test", confirmation.test_metric) if confirmation.accuracy_measured
                     else ("val", confirmation.objective))
    fig, ax = plt.subplots(figsize=(7, 4))
    for position, candidate in enumerate(summary["candidate"]):
        scores = confirmation.scores(candidate, split)
        ax.scatter([position] * len(scores), scores, c="tab:blue", alpha=0.6)
        ax.errorbar(position, summary[f"{split}_mean"][position], yerr=summary[f"{split}_std"].fillna(0)[position],
                    fmt="_", c="black", capsize=8, markersize=20)
    for (name, (mean, _)), colour in zip(baselines.items(), ("tab:red", "tab:gray"), strict=False):
        ax.axhline(mean, ls="--", c=colour, label=f"baseline: {name}")
    ax.set_xticks(range(len(summary)), summary["candidate"], rotation=15)
    what = "test accuracy" if split == "test" else "val RankMe, no labels"
    ax.set(ylabel=f"{split} {metric}", title=f"confirmation: {what} per config (dots: seeds)")
    if baselines:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _figure_of(axes: Any) -> plt.Figure:
    return axes.figure if hasattr(axes, "figure") else axes.flat[0].figure


def _save(fig: plt.Figure, path: Path) -> Path:
    with warnings.catch_warnings():  # a crowded figure keeps its layout instead of warning on the console
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_tables(report: SweepReport, folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = report.table.astype({c: str for c in report.table.columns if report.table[c].map(type).eq(list).any()})
    csv, parquet = folder / "trials.csv", folder / "trials.parquet"
    table.to_csv(csv, index=False)
    table.to_parquet(parquet, index=False)
    return [csv, parquet]
