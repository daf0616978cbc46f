"""A sweep: a search space and a base config -> Ray Tune trials searched by Optuna TPE, pruned by ASHA,
then the top configs and the default confirmed with seeds (:mod:`tuning.confirm`).

Two stages, each a Tune experiment in the sweep directory: **search** (trials select on the val
split and never read test; the default config runs first, as Optuna's enqueued point) and
**confirm** (the top-K configs and the default, each re-trained with S seeds; only these read
test). Every trial of both is mirrored in MLflow, tagged with its stage. The Optuna study lives in
``<sweep>/optuna.db``. A sweep killed or interrupted mid-way resumes with ``resume=True``:
finished trials are kept, unfinished ones continue from their last checkpoint, and MLflow runs
are reattached, not duplicated.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pyarrow.fs as pafs
from mlflow.entities import Metric
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray import tune
from ray.tune import Checkpoint
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from search_spaces import SearchSpace, load_space
from ssl_train.augment.preview import save_preview
from ssl_train.augment.recipes import effective_ops
from ssl_train.config import ConfigError, TrainConfig, check_at_least, load_config
from ssl_train.data import load_splits, uris
from ssl_train.status import Status
from ssl_train.training.distributed import check_capacity, ensure_ray
from tuning.confirm import CONFIRM_KEY, DEFAULT_CANDIDATE, Margin, candidates, confirmation_grid
from tuning.progress import CompactReporter, log_to_file
from tuning.tracking import (
    CANDIDATE_TAG,
    DEFAULT_EXPERIMENT,
    DEFAULT_TAG,
    MLflowSweepCallback,
    default_tracking_uri,
    git_commit,
    labels_tag,
    trial_outcome,
)
from tuning.trial import (
    OBJECTIVE,
    TRIAL_CHECKPOINTS,
    TRIAL_CPU_WHEN_DISTRIBUTED,
    check_labels,
    check_objective,
    run_trial,
    trial_config,
)

SETTINGS_FILE = "ssl_tune_sweep.json"
STUDY_FILE = "optuna.db"  # the persisted Optuna study: optuna-dashboard sqlite:///<sweep>/optuna.db
CONFIRM_DIR = "confirm"  # the confirmation stage's Tune experiment, inside the sweep directory
optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created ..." and per-trial lines
LOG_FILE = "sweep.log"  # Tune's status tables and Ray's INFO logs (the console gets the compact lines)
EXTEND_PREFIX = "extend-"  # Tune experiments that extend a finished search (--resume NAME --trials N)


def default_min_epochs(epochs: int) -> int:
    """ASHA's grace period unless --min-epochs says otherwise: half the trials' epochs, rounded up, and at least 2
    (capped at the epochs). On the demo (MNIST-5k, 6 epochs, 24 random configs, bench/asha_rungs.py) val at epoch
    1, 2, 3 ranked configs by their final val with Spearman -0.19, 0.70, 0.80: epoch 1, in the warm-up, says nothing."""
    return min(epochs, max(2, math.ceil(epochs / 2)))


@dataclass
class SweepSettings:
    """How to search: what ``ssl-tune tune`` flags set."""

    space: str = "byol"
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    trials: int = 12
    min_epochs: int | None = None  # epochs before ASHA may stop a trial; None: half the trials' epochs
    reduction_factor: int = 2
    concurrency: int = 2
    searcher: str = "tpe"
    scheduler: str = "asha"
    objective: str = "knn_acc"  # knn_acc | linear_acc | rankme (needs no labels)
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
    confirm: bool = True
    confirm_top: int = 2
    confirm_seeds: int = 3
    extensions: int = 0  # Tune experiments extend-1..K added by --resume NAME --trials N
    register: str | None = None  # register the winner's MLflow Model under this name
    keep_checkpoints: bool = False  # keep every trial's newest checkpoint, not only the logged winners'
    start_timeout_s: float | None = 600.0  # fail a stage none of whose trials started by then (None: wait forever)

    def base_config(self) -> TrainConfig:
        """The search trials' base: the user's config, never evaluated on test (confirmation runs turn it on)."""
        overrides = [f"eval.collapse_threshold={self.collapse_threshold}", *self.overrides, "eval.test_at_end=false"]
        if self.objective == "linear_acc":
            overrides.append("eval.linear_probe=true")
        return load_config(self.config, overrides).with_absolute_paths()  # trials run in their own directories


def base_values(base: TrainConfig) -> dict[str, Any]:
    """Every config key's value in the base, a per-op augmentation left to ``strength`` as the value it gets."""
    return {**base.flat(), **effective_ops(base)}


def default_point(space: SearchSpace, base: TrainConfig) -> dict[str, Any]:
    """The base config's value of every searched key, as Optuna stores it (the first trial); a per-op
    augmentation left to ``strength`` counts as the value it gets from it, and a key whose default the space
    cannot take is left for Optuna to sample."""
    flat = base_values(base)
    point = {param.path: param.optuna_value(flat[param.path]) for param in space.params}
    return {key: value for key, value in point.items() if value is not None}


class TruthfulOptunaSearch(OptunaSearch):
    """Ray's ``OptunaSearch``, telling Optuna how each trial really ended.

    Ray's own tells Optuna COMPLETE for every trial that reported a value, so a trial that ASHA
    stopped after 2 epochs teaches TPE its 2-epoch value as if it were a full run. Here only a trial
    that trained every epoch is COMPLETE. ASHA-stopped and time-limited trials are PRUNED: TPE then
    ranks them by the epoch they reached, from the per-epoch val values that ``on_trial_result``
    reports as intermediate values. Diverged and collapsed trials are PRUNED too, at their objective
    of 0, so TPE learns to avoid them; trials that raised are FAIL. The ssl-tune status and reason
    are user attributes of the Optuna trial. Subclassing keeps Ray's ask/suggest, warm-start and
    save/restore, which a Searcher of our own would have to repeat.
    """

    def __init__(self, *args: Any, time_limit_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.time_limit_s = time_limit_s

    def suggest(self, trial_id: str) -> dict | None:
        suggestion = super().suggest(trial_id)
        if trial_id in self._ot_trials:  # which Tune trial (and MLflow run, tag ray_trial_id) this study trial is
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        with contextlib.suppress(UpdateFinishedTrialError):  # see on_trial_complete
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if error:
            status, reason = Status.FAILED, "the trial raised an error"
        else:
            status, reason = trial_outcome(result or {}, self.time_limit_s)
        # After a hard crash the study (sqlite, written at once) can be ahead of this searcher's pickled
        # state (saved every few seconds): a trial already told is told nothing again.
        with contextlib.suppress(UpdateFinishedTrialError):
            if result and self.metric in result:  # Tune sends a trial's last result here, not to on_trial_result
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a step already reported is ignored, and says so
                    ot_trial.report(float(result[self.metric]), int(result["training_iteration"]))
            ot_trial.set_user_attr("ssl_tune_status", status)
            ot_trial.set_user_attr("ssl_tune_reason", reason)
            if status == Status.FINISHED:
                self._ot_study.tell(ot_trial, float(result[self.metric]), state=TrialState.COMPLETE)
            else:
                self._ot_study.tell(ot_trial, state=TrialState.FAIL if error else TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def study_storage(path: Path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{path / STUDY_FILE}")


def build_searcher(
    space: SearchSpace, settings: SweepSettings, base: TrainConfig, path: Path, enqueue_default: bool = True
) -> OptunaSearch:
    """Optuna TPE (multivariate; constant liar when trials run at once; grouped for ``when:``) or random,
    on the sweep's persisted study (continued when it exists); the default config first when ``enqueue_default``."""
    conditional = any(param.when for param in space.params)
    sampler = (
        optuna.samplers.TPESampler(
            multivariate=True, group=conditional, constant_liar=settings.concurrency > 1, seed=settings.seed,
            n_startup_trials=max(3, settings.trials // 4),
        )
        if settings.searcher == "tpe"
        else optuna.samplers.RandomSampler(seed=settings.seed)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate, group, constant_liar
        return TruthfulOptunaSearch(
            space=space.suggest,
            metric=OBJECTIVE,
            mode="max",
            sampler=sampler,
            points_to_evaluate=[default_point(space, base)] if enqueue_default else None,
            study_name=settings.name,
            storage=study_storage(path),
            time_limit_s=settings.trial_time_limit_s,
        )


def build_scheduler(settings: SweepSettings, max_epochs: int) -> tune.schedulers.TrialScheduler:
    if settings.scheduler == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_epochs,
        grace_period=min(settings.min_epochs or default_min_epochs(max_epochs), max_epochs),
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
    """The sweep's own files (settings, Optuna study, best config, tables, plots): a local directory.

    It is ``<storage>/<name>`` for a local ``--storage`` or a ``file://`` URI, and ``runs/sweeps/<name>``
    here when the storage is remote (``s3://...``), where Ray keeps the Tune experiments.
    """
    local = uris.local_path(settings.storage, "--storage")
    return (local if local is not None else Path("runs/sweeps").resolve()) / settings.name


def tune_path(settings: SweepSettings, experiment: str | None = None) -> str:
    """Where Tune keeps the sweep's search experiment, or one nested in it (``extend-1``, ``confirm-12``):
    a local path or the storage URI, given to Ray untouched."""
    root = f"{uris.absolute(settings.storage).rstrip('/')}/{settings.name}"
    return root if experiment is None else f"{root}/{experiment}"


def _trial_describer(base: TrainConfig, space: SearchSpace, space_source: str, preview_images, workdir: Path):
    """For the MLflow callback: a trial's full params, tags and artifacts (config YAML, augmentation preview)."""
    commit = git_commit()
    flat = base_values(base)  # the default trial holds these values (its per-op augmentations spelled out)
    default_values = {key: flat[key] for key in default_point(space, base)}

    def describe(trial: Trial) -> tuple[dict[str, Any], dict[str, str], list[Path]]:
        config = trial_config(base.to_dict(), trial.config, str(workdir / trial.trial_id))
        folder = Path(tempfile.mkdtemp(prefix=f"trial-{trial.trial_id}-", dir=workdir))
        artifacts = [config.save(folder / "config.yaml")]
        artifacts.append(save_preview(config, preview_images, folder / "augment_preview.png", seed=config.seed))
        confirm = trial.config.get(CONFIRM_KEY)
        if confirm:
            is_default = confirm["candidate"] == DEFAULT_CANDIDATE
            names = {MLFLOW_RUN_NAME: f"confirm-{confirm['candidate']}-seed{confirm['seed_index']}",
                     CANDIDATE_TAG: confirm["candidate"]}
        else:
            is_default = all(trial.config.get(k) == v for k, v in default_values.items())
            names = {MLFLOW_RUN_NAME: f"trial-{trial.trial_id}"}
        tags = {
            **names,
            DEFAULT_TAG: str(is_default).lower(),
            "method": config.method,
            "dataset": config.data.source if config.data.source != "folder" else str(config.data.path),
            "search_space": space_source,
            "ray_trial_id": trial.trial_id,
            **({"git_commit": commit} if commit else {}),
        }
        return config.flat(), tags, artifacts

    return describe


@dataclass
class _Stage:
    """What the search and the confirmation stage share: settings, base config, space, data, directory."""

    settings: SweepSettings
    base: TrainConfig
    space: SearchSpace
    splits: Any
    path: Path

    def trainable(self) -> Any:
        return tune.with_resources(
            tune.with_parameters(run_trial, base_config=self.base.to_dict(), objective=self.settings.objective,
                                 splits=self.splits),
            trial_resources(self.base),
        )

    def callback(self, stage: str, tune_experiment: str) -> MLflowSweepCallback:
        workdir = self.path / "mlflow-staging"
        workdir.mkdir(parents=True, exist_ok=True)
        settings = self.settings
        return MLflowSweepCallback(
            tracking_uri=settings.tracking_uri,
            sweep_name=settings.name,
            experiment=settings.experiment,
            describe_trial=_trial_describer(self.base, self.space, self.space.source, self.splits.preview(8), workdir),
            sweep_tags={"method": self.base.method, "dataset": self.base.data.source,
                        "search_space": self.space.source, **labels_tag(self.splits.num_classes)},
            sweep_params={f"sweep.{k}": v for k, v in asdict(settings).items() if k != "overrides"},
            sweep_metrics={"leak_rate": self.splits.leaks.rate} if self.splits.leaks else None,
            stage=stage,
            tune_experiment=tune_experiment,
            trial_time_limit_s=settings.trial_time_limit_s,
        )

    def run_config(self, name: str, storage: str, stage: str) -> tune.RunConfig:
        settings = self.settings
        return tune.RunConfig(
            name=name,
            storage_path=storage,
            stop={"time_total_s": settings.trial_time_limit_s} if settings.trial_time_limit_s else None,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=TRIAL_CHECKPOINTS),
            # a trial whose node left (or whose process died) restarts from its last checkpoint
            failure_config=tune.FailureConfig(max_failures=self.base.scaling.max_failures),
            callbacks=[self.callback(stage, name), StartWatchdog(settings.start_timeout_s)],
            verbose=1,
            progress_reporter=CompactReporter(OBJECTIVE, _search_label if stage == "search" else _confirm_label,
                                              settings.objective),
        )


def _search_label(trial: Trial) -> str:
    """A search trial's searched values, short: ``lr=0.0004 tau_base=0.907``."""
    return " ".join(f"{key.rpartition('.')[2]}={_short(value)}" for key, value in trial.config.items()
                    if key not in ("method",))


def _confirm_label(trial: Trial) -> str:
    confirm = trial.config[CONFIRM_KEY]
    return f"config {confirm['candidate']} seed {confirm['seed_index']}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _check_counts(settings: SweepSettings, resume: bool) -> None:
    """The sweep's counts, before anything is saved or Ray starts (Tune and ASHA would raise only then).

    ``trials`` may be 0 on a resume: no extension.
    """
    check_at_least(settings, {"trials": 0 if resume else 1, "min_epochs": 1, "concurrency": 1, "keep_best": 0})


def _prepare(settings: SweepSettings, resume: bool) -> _Stage:
    """Check everything a sweep needs before any trial: settings, space, tracking server, data, cluster."""
    _check_counts(settings, resume)
    if resume:
        settings = load_settings(settings)
    settings.name = settings.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    base = settings.base_config()
    if not resume and settings.scheduler == "asha" and (settings.min_epochs or 0) > base.optim.epochs:
        raise ConfigError(f"--min-epochs {settings.min_epochs} is more than the trials' {base.optim.epochs} epochs "
                          "(--epochs / optim.epochs): ASHA could never stop a trial; lower --min-epochs")
    space = load_space(settings.space, base)
    check_objective(settings.objective, space)
    if settings.searcher not in ("tpe", "random") or settings.scheduler not in ("asha", "none"):
        raise ConfigError(
            f"searcher={settings.searcher!r} / scheduler={settings.scheduler!r}: use tpe|random and asha|none"
        )
    if settings.confirm and (settings.confirm_top < 1 or settings.confirm_seeds < 1):
        raise ConfigError(f"--confirm-top {settings.confirm_top} / --confirm-seeds {settings.confirm_seeds}: "
                          "both must be >= 1 (or --no-confirm)")
    settings.tracking_uri = settings.tracking_uri or default_tracking_uri()

    from tuning.tracking import check_reachable

    check_reachable(settings.tracking_uri)  # before any trial starts
    splits = load_splits(base.data)  # bad data fails here, once, not in every trial
    print(splits.summary())
    check_labels(settings.objective, splits)
    if splits.ssl_train is not None:  # a streamed set is counted by the workers that receive it
        space.check_batch_fits(base, len(splits.ssl_train))
    ensure_ray(settings.address)
    check_capacity(base, may_grow=settings.address is not None)  # a trial that can never be placed: say so now
    # Save Tune's experiment state every few seconds, so a hard crash loses little (Tune's "auto" can wait minutes).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    # Each trial keeps 1 checkpoint, so each one forces a state save (a resume never points at a deleted
    # checkpoint); small files, but Tune warns about it on every epoch. Not a problem here: no warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic engine, which uses our CompactReporter
    path = sweep_path(settings)
    log_to_file(path / LOG_FILE)
    print(f"full log: {path / LOG_FILE}")
    return _Stage(settings, base, space, splits, path)


def run_sweep(
    settings: SweepSettings, resume: bool = False, interruption: Interruption | None = None
) -> tuple[list[tune.Result], tune.ResultGrid | None]:
    """Run (or resume) a sweep's search and confirmation; return the search trials' and confirmation's results.

    The MLflow runs are written as it goes. With an ``interruption``, Ctrl-C/SIGTERM stop the
    sweep resumably and are recorded there (the confirmation stage then does not start).
    ``resume=True`` with more ``settings.trials`` than the sweep ran extends it: a further Tune
    experiment in the sweep directory asks the same Optuna study for the missing trials (re-running
    none), and confirmation is redone on the larger search. ``settings`` is updated in place with
    what a resumed sweep started with.
    """
    stage = _prepare(settings, resume)
    settings.__dict__.update(stage.settings.__dict__)
    settings, path = stage.settings, stage.path
    experiments = [tune_path(settings), *(tune_path(settings, f"{EXTEND_PREFIX}{k}")
                                          for k in range(1, settings.extensions + 1))]
    if resume:
        if not tune.Tuner.can_restore(experiments[0]):
            raise FileNotFoundError(f"--resume {settings.name}: no restorable sweep at '{experiments[0]}'")
        tuners = [tune.Tuner.restore(where, stage.trainable(), resume_unfinished=True, resume_errored=True)
                  for where in experiments]
    else:
        if tune.Tuner.can_restore(experiments[0]):
            raise ConfigError(f"sweep '{settings.name}' already exists at {experiments[0]}; "
                              f"use --resume {settings.name}")
        save_settings(settings, path)
        tuners = [_search_tuner(stage, settings.name, experiments[0].rpartition("/")[0], settings.trials,
                                enqueue_default=True)]
    search: list[tune.Result] = []
    with interruption or contextlib.nullcontext():  # after ray.init, which installs its own SIGTERM handler
        for tuner in tuners:
            search += list(tuner.fit())
        missing = settings.trials - len(search)
        if resume and missing > 0 and not _interrupted(interruption):
            settings.extensions += 1
            name = f"{EXTEND_PREFIX}{settings.extensions}"
            save_settings(settings, path)
            print(f"\nextending sweep {settings.name} by {missing} trials, to {settings.trials} ({name})")
            search += list(_search_tuner(stage, name, tune_path(settings), missing, enqueue_default=False).fit())
        save_settings(settings, path)
        if not settings.confirm or _interrupted(interruption):
            return search, None
        return search, _run_confirmation(stage, f"{CONFIRM_DIR}-{len(search)}")


def _interrupted(interruption: Interruption | None) -> bool:
    return interruption is not None and interruption.interrupted


def _search_tuner(stage: _Stage, name: str, storage: str, trials: int, enqueue_default: bool) -> tune.Tuner:
    """A Tune experiment of ``trials`` search trials asking the sweep's Optuna study (created or continued)."""
    settings = stage.settings
    return tune.Tuner(
        stage.trainable(),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            search_alg=build_searcher(stage.space, settings, stage.base, stage.path, enqueue_default),
            scheduler=build_scheduler(settings, stage.base.optim.epochs),
            num_samples=trials,
            max_concurrent_trials=settings.concurrency,
            time_budget_s=settings.time_budget_s,
            reuse_actors=True,  # ~3 s less start-up per trial on a small machine
            trial_dirname_creator=trial_dirname,
        ),
        run_config=stage.run_config(name, storage, "search"),
    )


def _run_confirmation(stage: _Stage, name: str) -> tune.ResultGrid:
    """The top-K search configs and the default, S seeds each, at the full epoch budget, as Tune trials.

    ``name`` (``confirm-<search trials>``) is the Tune experiment: a sweep extended later is confirmed anew.
    """
    from tuning.report import load_report

    settings, where = stage.settings, tune_path(stage.settings, name)
    if tune.Tuner.can_restore(where):
        tuner = tune.Tuner.restore(where, stage.trainable(), resume_unfinished=True, resume_errored=True)
    else:
        report = load_report(settings.tracking_uri, settings.name, settings.experiment)
        chosen = candidates(report.table, stage.space, settings.confirm_top)
        grid = confirmation_grid(chosen, settings.confirm_seeds, stage.base.seed)
        print(f"\nconfirming {len(chosen)} configs ({', '.join(chosen)}) with {settings.confirm_seeds} seeds each, "
              f"{stage.base.optim.epochs} epochs (the search trials' full budget): {len(grid)} runs")
        tuner = tune.Tuner(
            stage.trainable(),
            param_space={CONFIRM_KEY: tune.grid_search(grid)},
            tune_config=tune.TuneConfig(
                num_samples=1, max_concurrent_trials=settings.concurrency, reuse_actors=True,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=stage.run_config(name, tune_path(settings), "confirm"),
        )
    return tuner.fit()


class TrialsNeverStarted(RuntimeError):
    """No trial of a sweep's stage started within ``--start-timeout``."""


class StartWatchdog(tune.Callback):
    """Fails a Tune experiment none of whose trials has started ``timeout_s`` after the first was created.

    Started means Tune heard that the trial's actor is up (status RUNNING or later). A trial waits in
    PENDING while the cluster has no room (busy, or scaling up): a reason to raise the timeout. It also
    waited forever in one case seen in the tests: a sweep started from a Python process that had run
    streamed training (Ray Data) on the same cluster, whose driver never heard that the trial actors
    were alive. Either way the user gets a line that says what to do, not a silent hang.
    """

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self.first_created: float | None = None
        self.started = False

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self.started or not self.timeout_s or not trials:
            return
        if any(trial.status not in (Trial.PENDING, Trial.PAUSED) for trial in trials):
            self.started = True
            return
        self.first_created = self.first_created or time.monotonic()
        if time.monotonic() - self.first_created > self.timeout_s:
            import ray

            free = ray.available_resources().get("CPU", 0)
            raise TrialsNeverStarted(
                f"no trial started within {self.timeout_s:.0f} s ({len(trials)} waiting; the cluster has {free:g} "
                f"CPUs free). If the cluster is busy or scaling up, raise --start-timeout (0 waits forever); if this "
                "Python process ran streamed training (Ray Data) before, start the sweep from a fresh process "
                "(`ssl-tune tune`). The sweep resumes with --resume NAME")


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
    saved.trials = max(saved.trials, settings.trials or 0)  # --trials N on a resume extends the search to N
    saved.keep_checkpoints = settings.keep_checkpoints
    saved.start_timeout_s = settings.start_timeout_s
    return saved


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
    dropped_checkpoints: int = 0  # trials whose checkpoints were deleted (all but those logged to MLflow)

    def disk_line(self) -> str:
        """The sweep folder's size, and which checkpoints were deleted to keep it small."""
        dropped = (f"; deleted the checkpoints of {self.dropped_checkpoints} trials whose weights are not in MLflow "
                   "(--keep-checkpoints keeps them)" if self.dropped_checkpoints else "")
        return f"sweep folder {self.path}: {folder_size(self.path) / 1e6:.1f} MB{dropped}"


BASELINE_KEYS = ("raw_pixels", "random_init")  # the MLflow names of what baselines() returns, in its order


def baselines(base: TrainConfig, splits: Any, seeds: int, objective: str) -> dict[str, tuple[float, float]]:
    """What SSL must beat, on the same test split: kNN on raw pixels, and the backbone at random init (S seeds)."""
    from ssl_train.evaluation.evaluate import evaluate_backbone
    from ssl_train.evaluation.knn import knn_protocol, pixel_knn_accuracy
    from ssl_train.training.loop import build_model

    protocol = knn_protocol(base.eval, splits.eval_train.labels)
    random_init = [
        evaluate_backbone(build_model(base.replace({"seed": base.seed + index})).backbone, splits, base.eval,
                          split="test")[f"test_{objective}"]
        for index in range(seeds)
    ]
    return {f"raw pixels ({protocol})": (pixel_knn_accuracy(splits, base.eval), 0.0),
            f"random-init backbone ({objective})": (float(np.mean(random_init)), float(np.std(random_init, ddof=1))
                                                     if seeds > 1 else 0.0)}


def finish_sweep(
    settings: SweepSettings, search: tune.ResultGrid, confirm: tune.ResultGrid | None = None
) -> SweepOutcome:
    """After the last trial: the winner's config YAML, tables and plots on the parent run, the winner's weights."""
    from tuning.report import format_table, load_confirmation, load_report, load_study, write_plots, write_tables
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
    base = settings.base_config()

    loaded = load_confirmation(report, settings.tracking_uri, settings.objective, settings.experiment)
    confirmation, margin, text, reference = None, None, None, {}
    if loaded is not None and settings.confirm and loaded[0].summary().empty:
        text = loaded[0].format({})  # every confirmation run failed: say so; the search's best is the winner
        loaded = None
    if loaded is not None and settings.confirm:
        confirmation, configs = loaded
        measured = confirmation.test_metric
        if confirmation.accuracy_measured:  # data with no labels has no test split: nothing to compare with
            splits = load_splits(base.replace({"data.leak_check": False}).data)  # checked and logged at the start
            reference = baselines(base, splits, settings.confirm_seeds, measured)
        margin = confirmation.margin()
        text = confirmation.format(reference)
        winner = configs[confirmation.winner].replace({"seed": base.seed})
        summary = confirmation.summary().set_index("candidate")
        test_scores = {} if margin is None else {
            "confirm_margin": margin.difference, "confirm_margin_low": margin.low,
            "confirm_margin_high": margin.high,
            f"winner_test_{measured}": summary.loc[confirmation.winner, "test_mean"],
            f"default_test_{measured}": summary.loc[DEFAULT_CANDIDATE, "test_mean"],
            **{f"baseline_{name}_test": mean for name, (mean, _) in zip(BASELINE_KEYS, reference.values(),
                                                                         strict=True)},
        }
        client.log_batch(report.parent_id, metrics=[
            Metric(key, float(value), int(time.time() * 1000), 0) for key, value in {
                f"winner_val_{settings.objective}": summary.loc[confirmation.winner, "val_mean"], **test_scores,
            }.items() if np.isfinite(value)])
        client.set_tag(report.parent_id, "ssl_tune.winner", confirmation.winner)
        if margin is not None:
            client.set_tag(report.parent_id, "ssl_tune.margin_interval", margin.method)
        confirmation.runs.to_csv(path / "confirmation.csv", index=False)
        artifacts = [path / "confirmation.csv"]
        weights = _checkpoints(confirm or [])
        keep = confirmation.runs[confirmation.runs["candidate"] == confirmation.winner]
        scores = {"sweep": settings.name, "stage": "confirm",
                  f"val_{settings.objective}": f"{summary.loc[confirmation.winner, 'val_mean']:.4f}",
                  **({} if margin is None else
                     {f"test_{measured}": f"{summary.loc[confirmation.winner, 'test_mean']:.4f}"})}
    else:
        winner = report.configs[report.best["run_id"]]
        artifacts = []
        weights = _checkpoints(search)
        keep = report.table[report.table["status"] == Status.FINISHED].head(settings.keep_best)
        scores = {"sweep": settings.name, "stage": "search",
                  f"val_{settings.objective}": f"{float(report.best[OBJECTIVE]):.4f}"}
    # A re-run of the winner writes to a run directory of its own (not into the sweep) and reports test.
    best_config_path = winner.replace({"output_dir": TrainConfig.output_dir, "eval.test_at_end": True}).save(
        path / "best_config.yaml")
    study = load_study(report, settings.tracking_uri)
    artifacts += [best_config_path, *write_tables(report, path), path / STUDY_FILE,
                  *write_plots(study, path / "plots", confirmation, reference)]
    for artifact in artifacts:
        if artifact.exists():
            client.log_artifact(report.parent_id, str(artifact), "plots" if artifact.parent.name == "plots" else None)
    logged = _log_backbones(client, keep, weights, winner)
    model_uri = None
    if logged:
        from ssl_train.export.mlflow_model import log_embedding_model

        run_id, backbone = logged[0]
        model_uri = log_embedding_model(settings.tracking_uri, run_id, backbone, winner, settings.register, scores)
    client.log_metric(report.parent_id, f"best_search_val_{settings.objective}", float(report.best[OBJECTIVE]))
    client.set_terminated(report.parent_id, "FINISHED")
    dropped = 0 if settings.keep_checkpoints else drop_checkpoints(
        [*search, *(confirm or [])], keep=set(keep["trial"]))
    return SweepOutcome(
        name=settings.name, path=path, table_text=format_table(report), best_config_path=best_config_path,
        confirmation_text=text, margin=margin, parent_run_id=report.parent_id, model_uri=model_uri,
        dropped_checkpoints=dropped,
    )


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
