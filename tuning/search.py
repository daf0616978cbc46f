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
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from search_spaces import SearchSpace
from ssl_train.augment.recipes import effective_ops
from ssl_train.config import TrainConfig
from ssl_train.status import Status
from tuning.outcome import trial_outcome
from tuning.settings import STUDY_FILE, SweepSettings, default_min_epochs
from tuning.trial import OBJECTIVE

optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created ..." and per-trial lines

TRIAL_ATTR = "ray_trial_id"  # the study trial's Tune trial (and MLflow run, tag ray_trial_id)
ORPHAN_REASON = "never started: the driver stopped"  # ssl_tune_reason of a study trial Tune never recorded
ERROR_REASON = "the trial raised an error"


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


def is_default_trial(trial_config: dict[str, Any], space: SearchSpace, defaults: dict[str, Any]) -> bool:
    """Whether a search trial trains the base config, whose :func:`base_values` are ``defaults``: it holds the base
    value of every searched key it sampled (a conditional key left unsampled matches). Where the space cannot take a
    default, Optuna samples that key for the first trial too, so no trial is the default."""
    return all(trial_config.get(param.path, defaults[param.path]) == defaults[param.path] for param in space.params)


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
    after both saves is in no record at all, and :func:`settle_study` ends it on ``--resume``.

    The study learns how a trial ended only when this searcher saves (:meth:`save`), right after Tune saved a
    record that holds the trial as ended. Told at once, the study could hold an outcome Tune's record lacks: ASHA
    stops a trial, the study is told PRUNED, the driver dies before Tune's next save, and ``--resume`` runs the
    trial again, to a different end (the soak caught one trained to the last epoch). Ended in Tune's record but
    not yet told (killed between the two saves), a trial is told by :func:`settle_study` from that record.
    """

    def __init__(self, *args: Any, time_limit_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.time_limit_s = time_limit_s
        self._untold: list[tuple[str, str, str, dict | None]] = []  # ended trials the study learns at the next save

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
        self._untold.append((trial_id, *trial_ending(result, self.time_limit_s, error), result))
        self._completed_trials.add(trial_id)

    def save(self, checkpoint_path: str) -> None:
        """Tell the study how the trials ended that Tune's just-saved record holds as ended, then save as Ray does."""
        for trial_id, status, reason, result in self._untold:
            tell_outcome(self._ot_study, self._ot_trials[trial_id], status, reason, result, self.metric)
        self._untold.clear()
        super().save(checkpoint_path)


def trial_ending(result: dict | None, time_limit_s: float | None, error: bool) -> tuple[str, str]:
    """ssl-tune's status and reason of a trial that ended: failed when it raised, else from its last result."""
    return (Status.FAILED, ERROR_REASON) if error else trial_outcome(result or {}, time_limit_s)


def tell_outcome(study: optuna.Study, trial: optuna.Trial, status: str, reason: str, result: dict | None,
                 metric: str) -> None:
    """End a study trial as ssl-tune's ``status`` says: COMPLETE at its value when it trained every epoch, FAIL
    when it raised, PRUNED otherwise; its last value is reported at its last epoch. A trial the study has
    already ended (told before a hard crash) is left as it is."""
    with contextlib.suppress(UpdateFinishedTrialError):
        if result and metric in result:  # Tune sends a trial's last result to on_trial_complete only
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a step already reported is ignored, and says so
                trial.report(float(result[metric]), int(result["training_iteration"]))
        trial.set_user_attr("ssl_tune_status", status)
        trial.set_user_attr("ssl_tune_reason", reason)
        if status == Status.FINISHED:
            study.tell(trial, float(result[metric]), state=TrialState.COMPLETE)
        else:
            study.tell(trial, state=TrialState.FAIL if status == Status.FAILED else TrialState.PRUNED)


def settle_study(
    study: optuna.Study, record: dict[str, tuple[str, dict]], time_limit_s: float | None
) -> tuple[list[int], list[int]]:
    """Before a resume runs, end every RUNNING study trial that nothing would end.

    ``record`` maps the trial ids of every Tune experiment of the sweep to their saved Tune status and last result.
    A study trial in no record (asked for after Tune's last save, or killed before it had a Tune trial id) is told
    FAIL with reason :data:`ORPHAN_REASON`; one the record holds as ended (the driver stopped after Tune's save and
    before the searcher's, :class:`TruthfulOptunaSearch`) is told how it ended, from the record. Returns the numbers
    of both: (orphans, told late).
    """
    orphans: list[int] = []
    late: list[int] = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tune_status, last_result = record.get(frozen.user_attrs.get(TRIAL_ATTR), (None, None))
        if tune_status is None:
            ending, ended = (Status.FAILED, ORPHAN_REASON), orphans
        elif tune_status in (Trial.TERMINATED, Trial.ERROR):
            ending, ended = trial_ending(last_result, time_limit_s, tune_status == Trial.ERROR), late
        else:  # it resumes, and the searcher tells its end
            continue
        tell_outcome(study, optuna.Trial(study, frozen._trial_id), *ending, last_result, OBJECTIVE)
        ended.append(frozen.number)
    log = logging.getLogger("ssl_tune.sweep")
    if orphans:
        log.info("closed Optuna trials %s as FAIL (%s): in no saved Tune record", orphans, ORPHAN_REASON)
    if late:
        log.info("ended Optuna trials %s as Tune's saved record ends them", late)
    return orphans, late


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
