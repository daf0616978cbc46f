"""A sweep: a search space and a base config -> Ray Tune trials searched by Optuna TPE, pruned by ASHA.

The default config runs as the first trial (Optuna's enqueued point), so every sweep
reports how far the best trial beats it. Every trial is mirrored in MLflow. A sweep killed
or interrupted mid-way resumes with ``resume=True``: finished trials are kept, unfinished
ones continue from their last checkpoint, and MLflow runs are reattached, not duplicated.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from search_spaces import SearchSpace, load_space
from ssl_train.augment import save_preview
from ssl_train.config import ConfigError, TrainConfig, load_config
from ssl_train.data import load_splits
from ssl_train.distributed import check_capacity, ensure_ray
from tuning.tracking import DEFAULT_EXPERIMENT, DEFAULT_TAG, MLflowSweepCallback, default_tracking_uri, git_commit
from tuning.trial import OBJECTIVE, TRIAL_CPU_WHEN_DISTRIBUTED, run_trial, trial_config

SETTINGS_FILE = "ssl_tune_sweep.json"


@dataclass
class SweepSettings:
    """How to search: what ``ssl-tune tune`` flags set."""

    space: str = "byol"
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    trials: int = 12
    min_epochs: int = 2
    reduction_factor: int = 2
    concurrency: int = 2
    searcher: str = "tpe"
    scheduler: str = "asha"
    objective: str = "val_knn_acc"
    collapse_threshold: float = 0.05
    trial_time_limit_s: float | None = None
    time_budget_s: float | None = None
    seed: int = 0
    name: str | None = None
    storage: str = "runs/sweeps"
    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    keep_best: int = 3
    address: str | None = None

    def base_config(self) -> TrainConfig:
        overrides = [f"eval.collapse_threshold={self.collapse_threshold}", *self.overrides]
        if self.objective == "val_linear_acc":
            overrides.append("eval.linear_probe=true")
        return load_config(self.config, overrides).with_absolute_paths()  # trials run in their own directories


def default_point(space: SearchSpace, base: TrainConfig) -> dict[str, Any]:
    """The base config's value of every searched key, as Optuna labels (the first trial)."""
    flat = base.flat()
    point: dict[str, Any] = {}
    for param in space.params:
        value = flat[param.path]
        if param.kind == "choice":
            labels = param.choice_labels()
            label = value if value in labels else json.dumps(value)
            if label not in labels:
                continue  # the default is not among the choices: Optuna samples this one
            point[param.path] = label
        elif param.low <= value <= param.high:
            point[param.path] = value
    return point


def build_searcher(space: SearchSpace, settings: SweepSettings, base: TrainConfig) -> OptunaSearch:
    sampler = (
        optuna.samplers.TPESampler(multivariate=True, seed=settings.seed, n_startup_trials=max(3, settings.trials // 4))
        if settings.searcher == "tpe"
        else optuna.samplers.RandomSampler(seed=settings.seed)
    )
    return OptunaSearch(
        space=space.suggest,
        metric=OBJECTIVE,
        mode="max",
        sampler=sampler,
        points_to_evaluate=[default_point(space, base)],
    )


def build_scheduler(settings: SweepSettings, max_epochs: int) -> tune.schedulers.TrialScheduler:
    if settings.scheduler == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_epochs,
        grace_period=min(settings.min_epochs, max_epochs),
        reduction_factor=settings.reduction_factor,
    )


def trial_resources(base: TrainConfig) -> dict[str, float]:
    """One-worker trials hold their worker's resources; multi-worker trials only a sliver (Train holds the rest)."""
    s = base.scaling
    if s.max_workers > 1:
        return {"cpu": TRIAL_CPU_WHEN_DISTRIBUTED}
    return {"cpu": s.cpus_per_worker, **({"gpu": s.gpus_per_worker} if s.use_gpu else {})}


def trial_dirname(trial: Trial) -> str:
    return f"trial_{trial.trial_id}"


def sweep_path(settings: SweepSettings) -> Path:
    return Path(settings.storage).resolve() / settings.name


def _trial_describer(base: TrainConfig, space: SearchSpace, space_source: str, preview_images, workdir: Path):
    """For the MLflow callback: a trial's full params, tags and artifacts (config YAML, augmentation preview)."""
    commit = git_commit()
    flat = base.flat()
    default_values = {key: flat[key] for key in default_point(space, base)}

    def describe(trial: Trial) -> tuple[dict[str, Any], dict[str, str], list[Path]]:
        config = trial_config(base.to_dict(), trial.config, str(workdir / trial.trial_id))
        folder = Path(tempfile.mkdtemp(prefix=f"trial-{trial.trial_id}-", dir=workdir))
        artifacts = [config.save(folder / "config.yaml")]
        artifacts.append(save_preview(config, preview_images, folder / "augment_preview.png", seed=config.seed))
        is_default = all(trial.config.get(k) == v for k, v in default_values.items())
        tags = {
            DEFAULT_TAG: str(is_default).lower(),
            "method": config.method,
            "dataset": config.data.source if config.data.source != "folder" else str(config.data.path),
            "search_space": space_source,
            "ray_trial_id": trial.trial_id,
            **({"git_commit": commit} if commit else {}),
        }
        return config.flat(), tags, artifacts

    return describe


def run_sweep(
    settings: SweepSettings, resume: bool = False, interruption: Interruption | None = None
) -> tune.ResultGrid:
    """Run (or resume) a sweep and return Tune's results; the MLflow runs are written as it goes.

    With an ``interruption``, Ctrl-C/SIGTERM stop the sweep resumably and are recorded there.
    """
    if resume:
        settings = load_settings(settings)
    settings.name = settings.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    base = settings.base_config()
    space = load_space(settings.space, base)
    if settings.searcher not in ("tpe", "random") or settings.scheduler not in ("asha", "none"):
        raise ConfigError(
            f"searcher={settings.searcher!r} / scheduler={settings.scheduler!r}: use tpe|random and asha|none"
        )
    path = sweep_path(settings)
    tracking_uri = settings.tracking_uri = settings.tracking_uri or default_tracking_uri()

    from tuning.tracking import check_reachable

    check_reachable(tracking_uri)  # before any trial starts
    splits = load_splits(base.data)  # bad data fails here, once, not in every trial
    print(splits.summary())
    ensure_ray(settings.address)
    check_capacity(base, may_grow=settings.address is not None)  # a trial that can never be placed: say so now

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_config=base.to_dict(), objective=settings.objective, splits=splits),
        trial_resources(base),
    )
    workdir = path / "mlflow-staging"
    workdir.mkdir(parents=True, exist_ok=True)
    callback = MLflowSweepCallback(
        tracking_uri=tracking_uri,
        sweep_name=settings.name,
        experiment=settings.experiment,
        describe_trial=_trial_describer(base, space, space.source, splits.preview(8), workdir),
        sweep_tags={"method": base.method, "dataset": base.data.source, "search_space": space.source},
        sweep_params={f"sweep.{k}": v for k, v in asdict(settings).items() if k != "overrides"},
        trial_time_limit_s=settings.trial_time_limit_s,
    )
    # Save Tune's experiment state every few seconds, so a hard crash loses little (Tune's "auto" can wait minutes).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise FileNotFoundError(f"--resume {settings.name}: no restorable sweep at '{path}'")
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        if path.exists() and tune.Tuner.can_restore(str(path)):
            raise ConfigError(f"sweep '{settings.name}' already exists at {path}; use --resume {settings.name}")
        save_settings(settings, path)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE,
                mode="max",
                search_alg=build_searcher(space, settings, base),
                scheduler=build_scheduler(settings, base.optim.epochs),
                num_samples=settings.trials,
                max_concurrent_trials=settings.concurrency,
                time_budget_s=settings.time_budget_s,
                reuse_actors=True,  # ~3 s less start-up per trial on a small machine
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=settings.name,
                storage_path=str(path.parent),
                stop={"time_total_s": settings.trial_time_limit_s} if settings.trial_time_limit_s else None,
                callbacks=[callback],
                verbose=1,
                progress_reporter=tune.CLIReporter(
                    metric_columns={"epoch": "epoch", "loss": "loss", OBJECTIVE: OBJECTIVE, "status": "status"},
                    parameter_columns=space.searched_keys(),
                    max_report_frequency=15,
                    sort_by_metric=True,
                ),
            ),
        )
    with interruption or contextlib.nullcontext():  # after ray.init, which installs its own SIGTERM handler
        return tuner.fit()


class Interruption:
    """Ctrl-C and SIGTERM stop a sweep the way Tune stops on SIGUSR1: trials halt, state is saved for ``--resume``.

    Tune's own SIGINT hook is turned off (``TUNE_DISABLE_SIGINT_HANDLER``) so that we can
    record that the sweep was interrupted (Tune's ``fit`` returns normally either way) and
    treat SIGTERM the same. A second signal falls back to the default behaviour.
    """

    def __init__(self) -> None:
        self.signal: int | None = None

    def __enter__(self) -> Interruption:
        self.previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for sig in self.previous:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum
        print(f"\nssl-tune: {signal.Signals(signum).name} received, stopping trials and saving the sweep state...")
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune's graceful stop

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)

    @property
    def interrupted(self) -> bool:
        return self.signal is not None


def save_settings(settings: SweepSettings, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=2))


def load_settings(settings: SweepSettings) -> SweepSettings:
    """The settings a sweep started with (``--resume NAME`` needs only the name and storage)."""
    stored = sweep_path(settings) / SETTINGS_FILE
    if not settings.name or not stored.is_file():
        raise FileNotFoundError(f"--resume {settings.name}: no sweep settings at '{stored}'")
    saved = SweepSettings(**json.loads(stored.read_text()))
    saved.tracking_uri = settings.tracking_uri or saved.tracking_uri
    saved.address = settings.address
    return saved


@dataclass
class SweepOutcome:
    name: str
    path: Path
    table_text: str
    best_config_path: Path
    best_objective: float
    default_objective: float | None
    parent_run_id: str


def finish_sweep(settings: SweepSettings, results: tune.ResultGrid) -> SweepOutcome:
    """After the last trial: best config YAML, tables and plots on the parent run, weights of the top trials."""
    from ssl_train.run import export_backbone
    from tuning.report import format_table, load_report, write_plots, write_tables
    from tuning.tracking import SweepTracker, TrackingError

    path = sweep_path(settings)
    try:
        tracker = SweepTracker(settings.tracking_uri, settings.name, settings.experiment)  # checks the server
    except TrackingError as error:
        raise TrackingError(
            f"{error}. The sweep's results are kept in {path}; once the server is back, "
            f"`ssl-tune tune --resume {settings.name}` logs what is missing and writes the report"
        ) from None
    report = load_report(settings.tracking_uri, settings.name, settings.experiment)
    if report.table.empty:
        raise RuntimeError(f"sweep {settings.name} has no trials in MLflow")
    tracker.parent_id = report.parent_id
    client = tracker.client

    best = report.best
    best_config_path = report.configs[best["run_id"]].save(path / "best_config.yaml")
    artifacts = [best_config_path, *write_tables(report, path), *write_plots(report, path / "plots")]
    for artifact in artifacts:
        client.log_artifact(report.parent_id, str(artifact), "plots" if artifact.parent.name == "plots" else None)

    checkpoints = {r.metrics.get("trial_id"): r.checkpoint for r in results if r.checkpoint is not None}
    finished = report.table[report.table["status"] == "finished"].head(settings.keep_best)
    for _, row in finished.iterrows():
        checkpoint = checkpoints.get(row["trial"])
        if checkpoint is not None:
            with checkpoint.as_directory() as directory, tempfile.TemporaryDirectory() as staging:
                weights = export_backbone(directory, report.configs[row["run_id"]], Path(staging) / "backbone.pt")
                client.log_artifact(row["run_id"], str(weights))

    default = report.default_trial()
    client.log_metric(report.parent_id, f"best_{OBJECTIVE}", float(best[OBJECTIVE]))
    client.set_terminated(report.parent_id, "FINISHED")
    return SweepOutcome(
        name=settings.name,
        path=path,
        table_text=format_table(report),
        best_config_path=best_config_path,
        best_objective=float(best[OBJECTIVE]),
        default_objective=None if default is None else float(default[OBJECTIVE]),
        parent_run_id=report.parent_id,
    )
