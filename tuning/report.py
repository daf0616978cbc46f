"""A sweep read back from MLflow: the trials table, the best config, and the plots a person looks at.

Everything here reads MLflow only, so ``ssl-tune report`` works on any sweep in a
tracking store, including one that ran on another machine.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from search_spaces import Param, SearchSpace, load_space  # noqa: E402
from ssl_train.config import TrainConfig  # noqa: E402
from tuning.tracking import DEFAULT_EXPERIMENT, DEFAULT_TAG, REASON_TAG, STATUS_TAG, SWEEP_TAG, TRIAL_TAG  # noqa: E402
from tuning.trial import OBJECTIVE  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class SweepReport:
    """The trials of one sweep as MLflow holds them."""

    name: str
    parent_id: str
    space: SearchSpace
    table: pd.DataFrame  # one row per trial, best first
    configs: dict[str, TrainConfig]  # run_id -> the trial's full config
    curves: dict[str, list[tuple[int, float]]]  # run_id -> [(epoch, knn_acc)]

    @property
    def best(self) -> pd.Series:
        return self.table.iloc[0]

    def default_trial(self) -> pd.Series | None:
        """The trial that ran the base config (Optuna's enqueued first point), if it ran."""
        rows = self.table[self.table["is_default"]]
        return None if rows.empty else rows.iloc[0]


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
    children = client.search_runs(
        [found.experiment_id], f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{TRIAL_TAG}` != 'sweep'", max_results=5000
    )
    rows, configs, curves = [], {}, {}
    for run in children:
        run_id = run.info.run_id
        configs[run_id] = config_from_params(run.data.params)
        history = client.get_metric_history(run_id, "val_knn_acc")
        curves[run_id] = sorted((m.step, m.value) for m in history)
        flat = configs[run_id].flat()
        rows.append({
            "trial": run.data.tags[TRIAL_TAG],
            OBJECTIVE: run.data.metrics.get(OBJECTIVE, 0.0),
            "val_knn_acc": run.data.metrics.get("val_knn_acc"),
            "epochs": int(run.data.metrics.get("epoch", 0)),
            "status": run.data.tags.get(STATUS_TAG, "running"),
            "reason": run.data.tags.get(REASON_TAG, ""),
            "is_default": run.data.tags.get(DEFAULT_TAG) == "true",
            **{key: flat[key] for key in space.searched_keys() if key in flat},
            "run_id": run_id,
            "started": run.info.start_time,
        })
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values([OBJECTIVE, "epochs"], ascending=False).reset_index(drop=True)
    return SweepReport(name, parent.info.run_id, space, table, configs, curves)


def format_table(report: SweepReport, top: int = 10) -> str:
    columns = ["trial", OBJECTIVE, "epochs", "status", *report.space.searched_keys()]
    shown = report.table[[c for c in columns if c in report.table]].head(top)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _distribution(param: Param) -> optuna.distributions.BaseDistribution:
    if param.kind in ("uniform", "loguniform"):
        return optuna.distributions.FloatDistribution(param.low, param.high, log=param.kind == "loguniform")
    if param.kind == "int":
        return optuna.distributions.IntDistribution(param.low, param.high)
    return optuna.distributions.CategoricalDistribution(param.choice_labels())


def to_study(report: SweepReport) -> optuna.Study:
    """The finished part of the sweep as an Optuna study, for Optuna's plots and importances."""
    study = optuna.create_study(direction="maximize")
    for _, row in report.table.iterrows():
        params, distributions = {}, {}
        for param in report.space.params:
            value = row.get(param.path)
            if value is None or (not isinstance(value, list) and pd.isna(value)):
                continue  # a conditional parameter this trial did not sample
            if param.kind == "choice":
                labels = param.choice_labels()
                value = value if value in labels else json.dumps(value)
                if value not in labels:
                    continue
            params[param.path], distributions[param.path] = value, _distribution(param)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=row[OBJECTIVE]))
    return study


def write_plots(report: SweepReport, folder: str | Path, top: int = 5) -> list[Path]:
    """objective vs trial, parallel coordinates, hyperparameter importances, kNN curves of the top trials."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    by_start = report.table.sort_values("started").reset_index(drop=True)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(by_start.index + 1, by_start[OBJECTIVE], c="tab:blue", label="trial")
    ax.plot(by_start.index + 1, by_start[OBJECTIVE].cummax(), c="tab:red", label="best so far")
    ax.set(xlabel="trial (start order)", ylabel=OBJECTIVE, title=f"{report.name}: objective vs trial")
    ax.legend()
    written.append(_save(fig, folder / "objective_vs_trial.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for run_id in report.table["run_id"].head(top):
        points = report.curves.get(run_id, [])
        if points:
            trial = report.table.set_index("run_id").loc[run_id, "trial"]
            ax.plot(*zip(*points, strict=True), marker="o", label=trial)
    ax.set(xlabel="epoch", ylabel="kNN accuracy", title=f"kNN accuracy of the top {top} trials")
    ax.legend(fontsize=7)
    written.append(_save(fig, folder / "knn_curves_top.png"))

    study = to_study(report)
    if len(study.trials) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            axes = optuna.visualization.matplotlib.plot_parallel_coordinate(study)
        written.append(_save(_figure_of(axes), folder / "parallel_coordinates.png"))
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError):
            importances = {}  # too few distinct trials to fit the importance model
        if importances:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.barh(list(importances)[::-1], list(importances.values())[::-1])
            ax.set(xlabel="importance (fANOVA)", title="hyperparameter importances")
            written.append(_save(fig, folder / "param_importances.png"))
    return written


def _figure_of(axes: Any) -> plt.Figure:
    return axes.figure if hasattr(axes, "figure") else axes.flat[0].figure


def _save(fig: plt.Figure, path: Path) -> Path:
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
