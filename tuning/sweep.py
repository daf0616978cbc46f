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
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from ray import tune
from ray.tune.experiment import Trial

from search_spaces import SearchSpace
from ssl_train.augment.preview import save_preview
from ssl_train.config import ConfigError, TrainConfig
from ssl_train.data import load_splits
from ssl_train.training.distributed import check_capacity, ensure_ray
from tuning.confirm import DEFAULT_CANDIDATE, candidates, confirmation_grid
from tuning.interrupt import ExperimentStateCopy, Interruption, StartWatchdog, repair_experiment_state
from tuning.objective import AUTO, check_labels, check_objective, orientation_warning, resolve_objective
from tuning.population import POPULATION_SEARCHERS, build_pbt, population_space
from tuning.progress import CompactReporter, hold_notices, log_to_file
from tuning.search import base_values, build_scheduler, build_searcher, is_default_trial, settle_study, study_storage
from tuning.server import check_reachable
from tuning.settings import (
    AUTO_SEEDS,
    CONFIRM_DIR,
    EXTEND_PREFIX,
    LOG_FILE,
    SweepSettings,
    check_settings,
    first_round_seeds,
    save_settings,
    sweep_path,
    tune_path,
)
from tuning.tracking import (
    CANDIDATE_TAG,
    DEFAULT_TAG,
    MLflowSweepCallback,
    default_tracking_uri,
    git_commit,
    labels_tag,
)
from tuning.trial import (
    CONFIRM_KEY,
    OBJECTIVE,
    TRIAL_CHECKPOINTS,
    TRIAL_CPU_WHEN_DISTRIBUTED,
    run_trial,
    trial_config,
)


def trial_resources(base: TrainConfig) -> dict[str, float]:
    """One-worker trials hold their worker's resources; multi-worker trials only a sliver (Train holds the rest)."""
    s = base.scaling
    if s.max_workers > 1:
        return {"cpu": TRIAL_CPU_WHEN_DISTRIBUTED}
    return {"cpu": s.cpus_per_worker, **({"gpu": s.gpus_per_worker} if s.use_gpu else {})}


def trial_dirname(trial: Trial) -> str:
    return f"trial_{trial.trial_id}"


def _trial_describer(base: TrainConfig, space: SearchSpace, space_source: str, preview_images, workdir: Path,
                     population: bool = False):
    """For the MLflow callback: a trial's full params, tags and artifacts (config YAML, augmentation preview).
    A PBT member starts from the default's values but is no default run: its values change as it goes."""
    commit = git_commit()
    defaults = base_values(base)  # the default trial holds these values (its per-op augmentations spelled out)

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
            is_default = not population and is_default_trial(trial.config, space, defaults)
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

    @property
    def population(self) -> bool:
        """A PBT search (:mod:`tuning.population`), not TPE's or random's trials."""
        return self.settings.searcher in POPULATION_SEARCHERS

    def trainable(self, stage: str = "search") -> Any:
        """The trial function; a PBT search's members continue lineages of the searched keys."""
        keys = tuple(self.space.searched_keys()) if stage == "search" and self.population else ()
        return tune.with_resources(
            tune.with_parameters(run_trial, base_config=self.base.to_dict(), objective=self.settings.objective,
                                 splits=self.splits, scheduled_keys=keys),
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
            describe_trial=_trial_describer(self.base, self.space, self.space.source, self.splits.preview(8), workdir,
                                            population=self.population),
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
        # A PBT member keeps every checkpoint while the search runs: one that another member copies must outlive it,
        # and Tune deletes a kept tail twice where PBT saves a function trial (an ERROR line a perturbation). Finishing
        # deletes the checkpoints of every trial whose weights are not kept (drop_checkpoints).
        keep = None if stage == "search" and self.population else TRIAL_CHECKPOINTS
        return tune.RunConfig(
            name=name,
            storage_path=storage,
            stop={"time_total_s": settings.trial_time_limit_s} if settings.trial_time_limit_s else None,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
            # a trial whose node left (or whose process died) restarts from its last checkpoint
            failure_config=tune.FailureConfig(max_failures=self.base.scaling.max_failures),
            callbacks=[self.callback(stage, name), StartWatchdog(settings.start_timeout_s),
                       ExperimentStateCopy(f"{storage.rstrip('/')}/{name}")],
            verbose=1,
            progress_reporter=CompactReporter(OBJECTIVE, _search_label if stage == "search" else _confirm_label,
                                              settings.objective, only_unfinished=stage != "search"),
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


def _prepare(settings: SweepSettings, resume: bool) -> _Stage:
    """Check everything a sweep needs before any trial: settings, space, tracking server, data, cluster."""
    settings, base, space = check_settings(settings, resume)
    settings.tracking_uri = settings.tracking_uri or default_tracking_uri()

    check_reachable(settings.tracking_uri)  # before any trial starts
    splits = load_splits(base.data)  # bad data fails here, once, not in every trial
    print(splits.summary())
    if settings.objective == AUTO:
        settings.objective = resolve_objective(AUTO, splits.labeled)
        print(f"objective: val {settings.objective} (--objective auto, for data "
              f"{'with' if splits.labeled else 'without'} labels)")
        base = settings.base_config()
        check_objective(settings.objective, space)
    check_labels(settings.objective, splits)
    warning = orientation_warning(settings.objective, base, splits)
    if warning:
        print(warning)
    if splits.ssl_train is not None:  # a streamed set is counted by the workers that receive it
        space.check_batch_fits(base, len(splits.ssl_train))
    held = hold_notices()  # Ray's start-up notices, for the log file
    ensure_ray(settings.address, dashboard=base.scaling.max_workers > 1)  # one-worker trials run no Train
    check_capacity(base, may_grow=settings.address is not None)  # a trial that can never be placed: say so now
    path = sweep_path(settings)
    log_to_file(path / LOG_FILE, held)
    print(f"full log: {path / LOG_FILE}")
    # Save Tune's experiment state every few seconds, so a hard crash loses little (Tune's "auto" can wait minutes).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    # Each trial keeps 1 checkpoint, so each one forces a state save (a resume never points at a deleted
    # checkpoint); small files, but Tune warns about it on every epoch. Not a problem here: no warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic engine, which uses our CompactReporter
    return _Stage(settings, base, space, splits, path)


def run_sweep(
    settings: SweepSettings, resume: bool = False, interruption: Interruption | None = None
) -> tuple[list[tune.Result], list[tune.Result] | None]:
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
        # A search trial that errored stays so: the study has been told FAIL and cannot take it back, so running it
        # again would leave Tune and MLflow saying one thing and Optuna another (the soak caught it: a node's death
        # counted twice ended a trial at once). Confirmation runs, which no study records, are re-run.
        _repair(experiments)
        tuners = [tune.Tuner.restore(where, stage.trainable(), resume_unfinished=True, resume_errored=False)
                  for where in experiments]
        if not stage.population:  # a PBT search has no study
            _settle_study(settings, path, experiments)
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
        if resume and missing > 0 and not stage.population and not _interrupted(interruption):
            settings.extensions += 1
            name = f"{EXTEND_PREFIX}{settings.extensions}"
            save_settings(settings, path)
            print(f"\nextending sweep {settings.name} by {missing} trials, to {settings.trials} ({name})")
            search += list(_search_tuner(stage, name, tune_path(settings), missing, enqueue_default=False).fit())
        save_settings(settings, path)
        if not settings.confirm or _interrupted(interruption):
            return search, None
        return search, _run_confirmation(stage, f"{CONFIRM_DIR}-{len(search)}")


def _settle_study(settings: SweepSettings, path: Path, experiments: list[str]) -> None:
    """Before a resume runs: end the study trials that nothing would end (:func:`settle_study`)."""
    import optuna

    record = {trial.trial_id: (trial.status, trial.last_result) for where in experiments
              for trial in tune.ExperimentAnalysis(where).trials}
    study = optuna.load_study(study_name=settings.name, storage=study_storage(path))
    settle_study(study, record, settings.trial_time_limit_s)


def _repair(experiments: list[str]) -> None:
    """Put back the complete copy of any Tune state file that the stop cut off (:func:`repair_experiment_state`)."""
    for where in experiments:
        if note := repair_experiment_state(where):
            print(note)


def _interrupted(interruption: Interruption | None) -> bool:
    return interruption is not None and interruption.interrupted


def _search_tuner(stage: _Stage, name: str, storage: str, trials: int, enqueue_default: bool) -> tune.Tuner:
    """A Tune experiment of ``trials`` search trials asking the sweep's Optuna study (created or continued), or
    a population of ``trials`` PBT members."""
    settings = stage.settings
    if stage.population:
        return _population_tuner(stage, name, storage)
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


def _population_tuner(stage: _Stage, name: str, storage: str) -> tune.Tuner:
    """PBT over ``--trials`` members, all starting from the default's values (:mod:`tuning.population`)."""
    settings = stage.settings
    recipe = stage.base.replace(stage.space.fixed)
    # Multi-worker members are not reused (below); Tune's hint to reuse them is not for the user to act on.
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
    return tune.Tuner(
        stage.trainable(),
        param_space=population_space(stage.space, base_values(recipe), settings.trials, stage.base.seed),
        tune_config=tune.TuneConfig(
            scheduler=build_pbt(stage.space, OBJECTIVE, settings.perturb_every, recipe.optim.epochs, settings.seed),
            num_samples=1,
            # No max_concurrent_trials: Tune would then create members only as slots free, and a member would compete
            # with the ones running beside it, not the population. All exist from the start; PBT pauses each at its
            # perturbation while others wait, so the population advances together, as many at once as the cluster
            # holds.
            time_budget_s=settings.time_budget_s,
            # a paused multi-worker member's process must end: its Train run goes with it
            reuse_actors=recipe.scaling.max_workers == 1,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=stage.run_config(name, storage, "search"),
    )


def _run_confirmation(stage: _Stage, name: str) -> list[tune.Result]:
    """The top-K search configs and the default, S seeds each, at the full epoch budget, as Tune trials; with
    ``--confirm-seeds auto``, then further rounds of seeds for the winner and the default until the margin is
    decided (:mod:`tuning.sequential`).

    ``name`` (``confirm-<search trials>``) is the Tune experiment: a sweep extended later is confirmed anew. Each
    further round is its own experiment (``confirm-<trials>-seeds<n>``), so a resumed sweep replays the decisions
    from the rounds it finds and continues from there.
    """
    from tuning.report import load_report

    settings = stage.settings
    report = load_report(settings.tracking_uri, settings.name, settings.experiment)
    chosen = candidates(report.table, stage.space, settings.confirm_top)
    seeds = first_round_seeds(settings)
    grid = confirmation_grid(chosen, range(seeds), stage.base.seed)
    print(f"\nconfirming {len(chosen)} configs ({', '.join(chosen)}) with {seeds} seeds each"
          f"{' (more if undecided: --confirm-seeds auto)' if settings.confirm_seeds == AUTO_SEEDS else ''}, "
          f"{stage.base.optim.epochs} epochs (the search trials' full budget): {len(grid)} runs")
    results = list(_confirmation_round(stage, name, grid).fit())
    while (more := _next_round(stage, report, chosen)) is not None:
        round_name = f"{name}-seeds{more[-1]['seed_index'] + 1}"
        print(f"\nthe margin is undecided: {len(more)} more runs ({round_name})")
        results += list(_confirmation_round(stage, round_name, more).fit())
    return results


def _confirmation_round(stage: _Stage, name: str, grid: list[dict[str, Any]]) -> tune.Tuner:
    """One round of confirmation runs as a Tune experiment (restored when it exists)."""
    settings, where = stage.settings, tune_path(stage.settings, name)
    if tune.Tuner.can_restore(where):
        _repair([where])
        return tune.Tuner.restore(where, stage.trainable("confirm"), resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        stage.trainable("confirm"),
        param_space={CONFIRM_KEY: tune.grid_search(grid)},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=settings.concurrency, reuse_actors=True,
                                    trial_dirname_creator=trial_dirname),
        run_config=stage.run_config(name, tune_path(settings), "confirm"),
    )


def _next_round(stage: _Stage, report: Any, chosen: dict[str, dict[str, Any]]) -> list[dict[str, Any]] | None:
    """With ``--confirm-seeds auto``, the next round's runs (the winner and the default at the next look's seeds),
    or None: fixed seeds, no labels, the default won, or the last look decided."""
    from tuning.report import load_sweep_confirmation

    if stage.settings.confirm_seeds != AUTO_SEEDS:
        return None
    loaded = load_sweep_confirmation(report, stage.settings)
    decided = loaded[0].decision() if loaded else None
    if decided is None or decided.stop:
        return None
    confirmation = loaded[0]
    following = confirmation.looks[confirmation.looks.index(decided.seeds) + 1]
    pair = {name: chosen[name] for name in (confirmation.winner, DEFAULT_CANDIDATE)}
    return confirmation_grid(pair, range(decided.seeds, following), stage.base.seed)
