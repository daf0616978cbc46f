"""The searcher and the scheduler of a sweep's search stage: Optuna TPE (or random) on a persisted study, told
how each trial really ended, and ASHA (or none)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from search_spaces import SearchSpace
from ssl_train.augment.recipes import effective_ops
from ssl_train.config import TrainConfig
from ssl_train.status import Status
from tuning.settings import STUDY_FILE, SweepSettings, default_min_epochs
from tuning.tracking import trial_outcome
from tuning.trial import OBJECTIVE

optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created ..." and per-trial lines

TRIAL_ATTR = "ray_trial_id"  # the study trial's Tune trial (and MLflow run, tag ray_trial_id)
ORPHAN_REASON = "never started: the driver stopped"  # ssl_tune_reason of a study trial Tune never recorded


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

    A driver killed mid-sweep can leave the study and Tune's saved record apart. Tune saves its trial list, then
    this searcher's state: a trial asked for between the two saves is in Tune's record (and resumes) but not in
    the restored ``_ot_trials``, so its first result adopts its study trial (:meth:`_adopt`); a trial asked for
    after both saves is in no record at all, and :func:`close_orphans` ends it on ``--resume``.
    """

    def __init__(self, *args: Any, time_limit_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.time_limit_s = time_limit_s

    def suggest(self, trial_id: str) -> dict | None:
        suggestion = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TRIAL_ATTR, trial_id)
        return suggestion

    def _adopt(self, trial_id: str) -> bool:
        """Take over the study trial of a Tune trial that the restored state does not know (see the class doc):
        True when there is one still running."""
        if trial_id in self._ot_trials:
            return True
        for trial in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get(TRIAL_ATTR) == trial_id:
                self._ot_trials[trial_id] = optuna.Trial(self._ot_study, trial._trial_id)
                return True
        return False

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._adopt(trial_id):
            return
        with contextlib.suppress(UpdateFinishedTrialError):  # see on_trial_complete
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or not self._adopt(trial_id):
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


def close_orphans(study: optuna.Study, recorded: set[str]) -> list[int]:
    """Tell FAIL (reason ORPHAN_REASON) every RUNNING study trial whose Tune trial is in no saved Tune record
    (``recorded``: the trial ids of every Tune experiment of the sweep), or that has no Tune trial id at all (asked
    and killed at once): nothing would ever end them. Returns their numbers."""
    closed: list[int] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(TRIAL_ATTR) in recorded:
            continue
        with contextlib.suppress(UpdateFinishedTrialError):  # ended meanwhile: left as it is
            orphan = optuna.Trial(study, trial._trial_id)
            orphan.set_user_attr("ssl_tune_status", Status.FAILED)
            orphan.set_user_attr("ssl_tune_reason", ORPHAN_REASON)
            study.tell(orphan, state=TrialState.FAIL)
            closed.append(trial.number)
    if closed:
        logging.getLogger("ssl_tune.sweep").info("closed Optuna trials %s as FAIL (%s): in no saved Tune record",
                                                 closed, ORPHAN_REASON)
    return closed


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
