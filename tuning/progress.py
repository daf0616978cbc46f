"""A quiet console for sweeps: one line per trial that ends, one summary line a minute, the rest to a file.

Tune's own output prints a box for every trial's config and result, and Ray forwards every
worker's log line; a 12-trial demo printed hundreds of lines. :class:`CompactReporter` (a Tune
``ProgressReporter``, used with the classic output engine, ``RAY_AIR_NEW_OUTPUT=0``) prints a line
when a trial ends (status, epochs, its objective, its searched values) and a summary line at an
interval naming the current best trial. The value on both is the one the sweep's table ranks by and
confirmation picks from: the objective a trial reported last, i.e. val at its last epoch (0 for a
diverged or collapsed trial), not its maximum over epochs. Tune's full status table and Ray's INFO logs
go to ``sweep.log`` in the sweep directory (:func:`log_to_file`).
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import ProgressReporter
from ray.tune.experiment import Trial

from ssl_train.status import Status
from tuning.outcome import RANKED_BY, trial_outcome

QUIET_LOGGERS = ("ray.tune", "ray.train", "ray.air", "ray.data")
# Loggers whose lines tell a user of ssl-tune nothing to act on, warnings included: Optuna's ("There are no complete
# trials.", "You need to set up the pruning feature ..." while ssl-tune tells Optuna each trial's fate itself), Ray's
# start-up notices ("Started a local Ray instance", that token authentication is on: it stays on) and MLflow's store
# set-up ("Creating initial MLflow database tables"): the file only.
# ray.tune.logger.logger: "Remote file not found: .../result.json" as a PBT member restarts from another's checkpoint
FILE_ONLY_LOGGERS = ("optuna", "ray._private.worker", "ray._private.authentication", "mlflow.store.db", "alembic",
                     "ray.tune.logger.logger")
# Tune's own lines as a sweep stops on a signal: ssl-tune says it stops, and how to resume (--resume NAME, not
# Tune's "Resume experiment with: Tuner.restore(...)"); the file keeps them.
FILE_ONLY_MESSAGES = ("Stop signal received", "Experiment has been interrupted")


def last_value(trial: Trial, metric: str) -> float | None:
    """The value of ``metric`` the trial reported last: what the sweep's table ranks trials by."""
    value = (trial.last_result or {}).get(metric)
    return None if value is None else float(value)


def rank_key(trial: Trial, metric: str) -> tuple[float, int]:
    """The table's order (:func:`tuning.report.load_report`): the last value, then the epochs reached."""
    return last_value(trial, metric) or 0.0, (trial.last_result or {}).get("epoch", 0)


class CompactReporter(ProgressReporter):
    """A line per ended trial and a summary line every ``interval_s``; the full table goes to ``log``.

    ``metric`` is the reported key (``objective``) and ``objective`` the accuracy it holds (``knn_acc``),
    which the printed label names. ``only_unfinished``: print the line of a trial that did not finish (failed,
    diverged, collapsed) and only count the finished ones (confirmation, whose table follows).

    Tune pickles the reporter with the experiment and a resume restores it: attributes that a newer version adds
    have class defaults, so a sweep started by an older one resumes.
    """

    only_unfinished = False

    def __init__(self, metric: str, label: Any, objective: str, interval_s: float = 60.0,
                 log: logging.Logger | None = None, only_unfinished: bool = False) -> None:
        self.metric = metric
        self.value_label = RANKED_BY.format(objective=objective)
        self.label = label  # trial -> the short text that names its searched values
        self.interval_s = interval_s
        self.log = log or logging.getLogger("ssl_tune.sweep")
        self.started = time.monotonic()
        self.last_summary = self.started
        self.reported: set[str] = set()
        self.pending: list[Trial] = []
        self.only_unfinished = only_unfinished

    def should_report(self, trials: list[Trial], done: bool = False) -> bool:
        self.pending = [t for t in trials if t.status in (Trial.TERMINATED, Trial.ERROR)
                        and t.trial_id not in self.reported]
        return bool(self.pending) or done or time.monotonic() - self.last_summary >= self.interval_s

    def report(self, trials: list[Trial], done: bool, *sys_info: Any) -> None:
        for trial in self.pending:
            self.reported.add(trial.trial_id)
            status = Status.FAILED if trial.status == Trial.ERROR else trial_outcome(trial.last_result or {}, None)[0]
            last = last_value(trial, self.metric)
            epochs = (trial.last_result or {}).get("epoch", 0)
            value = f"{last:.4f}" if last is not None else "-"
            line = f"  trial {trial.trial_id:<14} {status:<9} {epochs:>3} epochs  {self.value_label} {value}  " \
                   f"{self.label(trial)}"
            if self.only_unfinished and status == Status.FINISHED:
                self.log.info(line)
            else:
                print(line, flush=True)
        self.pending = []
        now = time.monotonic()
        if done or now - self.last_summary >= self.interval_s:
            self.last_summary = now
            print(self._summary(trials, now), flush=True)
        self.log.info("trials:\n%s", "\n".join(
            f"{t.trial_id} {t.status} epoch={(t.last_result or {}).get('epoch')} last={last_value(t, self.metric)} "
            f"max over epochs={(t.metric_analysis.get(self.metric) or {}).get('max')} {t.config}" for t in trials))

    def _summary(self, trials: list[Trial], now: float) -> str:
        counts = {status: sum(t.status == status for t in trials) for status in (Trial.RUNNING, Trial.PENDING)}
        ended = sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials)
        scored = [t for t in trials if last_value(t, self.metric) is not None]
        best = max(scored, key=lambda t: rank_key(t, self.metric), default=None)
        # Confirmation names no best: a run is one seed of a config, and its winner is the best mean (its table)
        best_text = (f"; current best: trial {best.trial_id}, {self.value_label} {last_value(best, self.metric):.4f}"
                     if best and not self.only_unfinished else "")
        minutes, seconds = divmod(int(now - self.started), 60)
        return (f"[{minutes}m{seconds:02d}s] {ended} ended, {counts[Trial.RUNNING]} running, "
                f"{counts[Trial.PENDING]} pending{best_text}")


class OneLineFormatter(logging.Formatter):
    """A record as one console line: its message and, for an exception, its type and first line (Tune logs a
    trial whose node died with a 30-line traceback); the traceback itself goes to the log file only."""

    def __init__(self, log_path: Path) -> None:
        super().__init__()
        self.log_path = log_path

    def format(self, record: logging.LogRecord) -> str:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return record.getMessage()
        first = (str(error).strip().splitlines() or [""])[0]
        return f"{record.getMessage()}: {type(error).__name__}: {first} (traceback in {self.log_path})"


def hold_notices() -> logging.handlers.MemoryHandler:
    """Until the sweep's log file exists (it is made once the cluster is known to fit the trials, so that a refused
    sweep leaves nothing): the records of the file-only loggers, Ray's start-up notices, are held in memory."""
    held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    for name in FILE_ONLY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [held]
        logger.propagate = False
    return held


def log_to_file(path: Path, held: logging.handlers.MemoryHandler | None = None) -> logging.Logger:
    """Send Ray's INFO logs (Tune, Train) and the reporter's full tables to ``path``, with the ``held`` records
    first; warnings still reach the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    to_console = logging.StreamHandler()
    to_console.setLevel(logging.WARNING)
    to_console.setFormatter(OneLineFormatter(path))
    to_console.addFilter(lambda record: not record.getMessage().startswith(FILE_ONLY_MESSAGES))
    for name in (*QUIET_LOGGERS, "ssl_tune"):
        logger = logging.getLogger(name)
        logger.handlers = [to_file, to_console]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    for name in FILE_ONLY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [to_file]
        logger.propagate = False
    if held is not None:
        held.setTarget(to_file)
        held.close()  # flushes the held records to the file
    return logging.getLogger("ssl_tune.sweep")


def quiet_worker_logs() -> None:
    """In a trial process: Ray's INFO lines (a checkpoint per epoch) stay out of the forwarded console output, and
    so does the exit that stops it (:func:`_no_exit_tracebacks`)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.unraisablehook = _no_exit_tracebacks


def _no_exit_tracebacks(unraisable: Any) -> None:
    """Tune ends a trial process with SIGTERM, which Ray's handler turns into SystemExit wherever the process is;
    inside a weakref callback or a finaliser Python prints it as "Exception ignored in: ..." with a traceback, which
    reached the console of 1 sweep in 4 and says nothing to act on. Every other unraisable error is printed."""
    if not issubclass(unraisable.exc_type, SystemExit):
        sys.__unraisablehook__(unraisable)
