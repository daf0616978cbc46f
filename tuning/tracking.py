"""MLflow tracking of a sweep: one parent run per sweep, one nested child run per trial.

All logging happens on the Tune driver (a :class:`ray.tune.Callback`), so only the driver
must reach the tracking server, concurrency is a non-issue, and a resumed sweep finds its
parent and children again by tag instead of creating new ones.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune.experiment import Trial
from ray.tune.logger import LoggerCallback

from ssl_train.status import Status
from tuning.outcome import trial_outcome
from tuning.population import EXPLOIT, SCHEDULE
from tuning.server import TrackingError, check_reachable
from tuning.settings import DEFAULT_EXPERIMENT

SWEEP_TAG = "ssl_tune.sweep"
TRIAL_TAG = "ssl_tune.trial_id"
STATUS_TAG = "ssl_tune.status"
REASON_TAG = "ssl_tune.reason"
DEFAULT_TAG = "ssl_tune.is_default_config"
STAGE_TAG = "ssl_tune.stage"  # search (selects on val) or confirm (seeded re-runs, the only ones that read test)
TUNE_EXPERIMENT_TAG = "ssl_tune.tune_experiment"  # the Tune experiment of a trial: the sweep's, extend-K, confirm-N
CANDIDATE_TAG = "ssl_tune.candidate"  # a confirmation run's config: "default" or trial_<id> of the search
SCHEDULE_TAG = "ssl_tune.schedule"  # a PBT member's lineage: its schedule steps (JSON), updated every epoch
EXPLOIT_TAG = "ssl_tune.exploit"  # a PBT member's exploit events, one tag each: ssl_tune.exploit.epoch<E>
LABELS_TAG = "ssl_tune.labels"  # the classes of the data, or that it has none and no accuracy was measured
NO_LABELS = "none: no accuracy measured (no test split, kNN or linear probe); runs scored by RankMe on val"
# MLflow prints "View run ... at: URL" for every run ended on a tracking server: 2 lines a trial. The console
# prints the runs page once; the sweep's own lines stay the only per-trial ones.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# What a tracking server that went away raises through MlflowClient (connection refused, timeouts, 5xx).
TRACKING_FAILURES = (MlflowException, requests.RequestException, OSError)


def default_tracking_uri(directory: str | Path = ".") -> str:
    """An sqlite store ``mlflow.db`` in ``directory``: no server needed."""
    return f"sqlite:///{(Path(directory) / 'mlflow.db').resolve()}"


def git_commit() -> str | None:
    """The project's git commit when it runs from a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def labels_tag(num_classes: int) -> dict[str, str]:
    """The tag that says whether the data has labels (``10 classes``) or none (:data:`NO_LABELS`)."""
    return {LABELS_TAG: f"{num_classes} classes" if num_classes else NO_LABELS}


def numeric_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a result: what MLflow can plot."""
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    }


class RunTracker:
    """Runs of one MLflow experiment: create, log epochs (each step once), close with a status."""

    def __init__(self, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT) -> None:
        check_reachable(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self._logged_steps: dict[str, dict[str, int]] = {}

    def _find(self, filter_string: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=2)
        return runs[0].info.run_id if runs else None

    def create_run(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """A new run holding ``params`` (the full flattened config) and ``tags``."""
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={MLFLOW_RUN_NAME: run_name, **tags})
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def log_epoch(self, run_id: str, metrics: dict[str, Any], step: int, timestamp_ms: int) -> None:
        """Log one epoch's metrics at ``step``, skipping steps this run already holds (re-run epochs after resume)."""
        done = self._logged_steps.setdefault(run_id, self._last_steps(run_id))
        fresh = {k: v for k, v in numeric_metrics(metrics).items() if step > done.get(k, -1)}
        if fresh:
            self.client.log_batch(run_id, metrics=[Metric(k, v, timestamp_ms, step) for k, v in fresh.items()])
            done.update(dict.fromkeys(fresh, step))

    def _last_steps(self, run_id: str) -> dict[str, int]:
        run = self.client.get_run(run_id)
        return {
            key: max(m.step for m in self.client.get_metric_history(run_id, key)) for key in run.data.metrics
        }

    def end_run(self, run_id: str, status: str, reason: str) -> None:
        """Close a run; ``status`` is ssl-tune's (finished, pruned, diverged, collapsed, failed)."""
        self.client.log_batch(run_id, tags=[RunTag(STATUS_TAG, status), RunTag(REASON_TAG, reason)])
        mlflow_status = {Status.FINISHED: "FINISHED", Status.PRUNED: "KILLED", Status.TIME_LIMIT: "KILLED",
                         Status.BUDGET: "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(run_id, status=mlflow_status)


class SweepTracker(RunTracker):
    """The runs of one sweep: a parent, and a child per trial found again by its trial id on resume."""

    def __init__(self, tracking_uri: str, sweep_name: str, experiment: str = DEFAULT_EXPERIMENT) -> None:
        super().__init__(tracking_uri, experiment)
        self.sweep_name = sweep_name
        self.parent_id: str | None = None

    def open_parent(self, tags: dict[str, str], params: dict[str, Any]) -> str:
        """The sweep's parent run: reattached on resume, created otherwise."""
        self.parent_id = self._find(f"tags.`{SWEEP_TAG}` = '{self.sweep_name}' and tags.`{TRIAL_TAG}` = 'sweep'")
        if self.parent_id is not None:
            self.client.update_run(self.parent_id, status="RUNNING")
            return self.parent_id
        tags = {SWEEP_TAG: self.sweep_name, TRIAL_TAG: "sweep", **tags}
        self.parent_id = self.create_run(self.sweep_name, params, tags)
        return self.parent_id

    def trial_run(self, trial_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> tuple[str, bool]:
        """The child run of a trial and whether it is new (a restarted trial keeps its run)."""
        existing = self._find(f"tags.`{SWEEP_TAG}` = '{self.sweep_name}' and tags.`{TRIAL_TAG}` = '{trial_id}'")
        if existing is not None:
            self.client.update_run(existing, status="RUNNING")
            return existing, False
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_id or "", SWEEP_TAG: self.sweep_name, TRIAL_TAG: trial_id,
                STATUS_TAG: Status.RUNNING, **tags}
        return self.create_run(run_name, params, tags), True

    def drop_runs_except(self, trial_ids: set[str], tune_experiment: str) -> list[str]:
        """Delete child runs of ``tune_experiment`` whose trials Tune does not know (started after its last
        state save, then a crash).

        Tune re-suggests such a trial under a new id, so keeping its run would show a trial
        the sweep never finished and does not count. Returns the dropped trial ids.
        """
        where = f"tags.`{SWEEP_TAG}` = '{self.sweep_name}' and tags.`{TUNE_EXPERIMENT_TAG}` = '{tune_experiment}'"
        dropped = []
        for run in self.client.search_runs([self.experiment_id], where, max_results=10_000):
            if run.data.tags[TRIAL_TAG] not in trial_ids:
                self.client.delete_run(run.info.run_id)
                dropped.append(run.data.tags[TRIAL_TAG])
        if dropped:
            print(f"ssl-tune: removed MLflow runs of {len(dropped)} trial(s) lost in the crash: {', '.join(dropped)}")
        return dropped

@dataclass
class TrialStarted:
    """A trial's child run: its full params, tags and artifact files."""

    trial: str
    params: dict[str, Any]
    tags: dict[str, str]
    artifacts: list[str]

    def write(self, callback: MLflowSweepCallback) -> None:
        callback.open_run(self.trial, self)


@dataclass
class EpochLogged:
    """One epoch's metrics of a trial, at ``step`` (the epoch), and tags it sets (a PBT member's schedule, exploits)."""

    trial: str
    metrics: dict[str, float]
    step: int
    timestamp_ms: int
    tags: dict[str, str] | None = None

    def write(self, callback: MLflowSweepCallback) -> None:
        run_id = callback.open_run(self.trial)
        callback.tracker.log_epoch(run_id, self.metrics, self.step, self.timestamp_ms)
        if self.tags:
            callback.tracker.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in self.tags.items()])


def member_tags(result: dict[str, Any]) -> dict[str, str]:
    """A PBT member's tags from its result: its schedule so far, and whom it copied when it just did
    (``ssl_tune.exploit.epoch003``: ``copied trial <id> at epoch 3; set augment.strength=0.8``)."""
    tags = {SCHEDULE_TAG: result[SCHEDULE]} if SCHEDULE in result else {}
    if EXPLOIT in result:
        event = json.loads(result[EXPLOIT])
        changed = ", ".join(f"{key}={value}" for key, value in event["set"].items()) or "nothing"
        tags[f"{EXPLOIT_TAG}.epoch{event['epoch']:03d}"] = (
            f"copied trial {event['from']} at epoch {event['epoch']}; set {changed}")
    return tags


@dataclass
class TrialEnded:
    """How a trial ended: ssl-tune's status and the reason."""

    trial: str
    status: str
    reason: str

    def write(self, callback: MLflowSweepCallback) -> None:
        callback.tracker.end_run(callback.open_run(self.trial), self.status, self.reason)


Record = TrialStarted | EpochLogged | TrialEnded


class MLflowSweepCallback(LoggerCallback):
    """Mirror a Tune sweep into MLflow from the driver: a child run per trial, metrics per epoch, final status.

    Ray Tune's ``LoggerCallback`` shape (``log_trial_start``, ``log_trial_result``, ``log_trial_end``).
    Every write goes through an outbox of typed records (:class:`TrialStarted`, :class:`EpochLogged`,
    :class:`TrialEnded`). When the
    tracking server goes away, trials keep training, the failure is printed once per trial, and
    the queue is retried every ``retry_s`` seconds and at the sweep's end; it is saved with Tune's
    experiment state (``get_state``), so a sweep that stops first logs it on ``--resume``. The
    MLflow client is made in ``setup`` (not pickled), so a restored sweep reattaches to its runs.
    """

    def __init__(
        self,
        tracking_uri: str,
        sweep_name: str,
        experiment: str,
        describe_trial: Callable[[Trial], tuple[dict[str, Any], dict[str, str], list[Path]]],
        sweep_tags: dict[str, str],
        sweep_params: dict[str, Any],
        stage: str = "search",
        sweep_metrics: dict[str, float] | None = None,
        tune_experiment: str = "",
        trial_time_limit_s: float | None = None,
        retry_s: float = 15.0,
        final_wait_s: float = 60.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.sweep_name = sweep_name
        self.experiment = experiment
        self.describe_trial = describe_trial
        self.sweep_tags = sweep_tags
        self.sweep_params = sweep_params
        self.sweep_metrics = sweep_metrics or {}  # logged on the parent run (the data's leak_rate)
        self.stage = stage
        self.tune_experiment = tune_experiment
        self.trial_time_limit_s = trial_time_limit_s
        self.retry_s = retry_s
        self.final_wait_s = final_wait_s
        self.tracker: SweepTracker | None = None
        self.runs: dict[str, str] = {}
        self.reconciled = False
        self.pending: list[Record] = []  # the outbox: records not yet in MLflow, oldest first
        self.unreachable_since: float | None = None
        self.warned: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tracker": None, "runs": {}, "reconciled": False, "pending": [],
                "unreachable_since": None, "warned": set()}

    def get_state(self) -> dict[str, Any] | None:
        return {"pending": list(self.pending)} if self.pending else None

    def set_state(self, state: dict[str, Any]) -> None:
        self.pending = list(state.get("pending", [])) + self.pending

    def setup(self, **info: Any) -> None:
        # One quick retry, not MLflow's default minutes of back-off: an outage must not stall the sweep's driver.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.tracker = SweepTracker(self.tracking_uri, self.sweep_name, self.experiment)
        parent = self.tracker.open_parent(self.sweep_tags, self.sweep_params)
        if self.sweep_metrics:
            now = int(time.time() * 1000)
            self.tracker.client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in self.sweep_metrics.items()])
        self._flush(force=True)

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if not self.reconciled:
            self.reconciled = True
            self.tracker.drop_runs_except({trial.trial_id for trial in trials}, self.tune_experiment)
        self._flush()

    def log_trial_start(self, trial: Trial) -> None:
        if trial.trial_id not in self.runs and not any(r.trial == trial.trial_id for r in self.pending):
            params, tags, artifacts = self.describe_trial(trial)
            tags = {STAGE_TAG: self.stage, TUNE_EXPERIMENT_TAG: self.tune_experiment, **tags}
            self._write(TrialStarted(trial.trial_id, params, tags, [str(path) for path in artifacts]))

    def log_trial_result(self, iteration: int, trial: Trial, result: dict) -> None:
        self.log_trial_start(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self._write(EpochLogged(trial.trial_id, numeric_metrics(result), step, int(result.get("timestamp", 0) * 1000),
                                member_tags(result) or None))

    def log_trial_end(self, trial: Trial, failed: bool = False) -> None:
        self.log_trial_start(trial)
        if failed:
            error = getattr(trial, "error_file", None) or "see the trial's error.txt in the sweep directory"
            status, reason = Status.FAILED, f"trial raised an error: {error}"
        else:
            status, reason = trial_outcome(trial.last_result or {}, self.trial_time_limit_s)
        self._write(TrialEnded(trial.trial_id, status, reason))

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        deadline = time.monotonic() + self.final_wait_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(min(5.0, self.retry_s))
            self._flush(force=True)
        if self.pending:
            print(f"ssl-tune: {len(self.pending)} MLflow record(s) of this sweep are not logged: {self.tracking_uri} "
                  f"is still unreachable. They are kept with the sweep's state; once the server is back, "
                  f"`ssl-tune tune --resume {self.sweep_name}` logs them.", flush=True)

    def _write(self, record: Record) -> None:
        self.pending.append(record)
        self._flush()

    def _flush(self, force: bool = False) -> None:
        """Log the queued records in order; on a connection failure keep them and try again later."""
        if self.tracker is None or not self.pending:
            return
        waiting = self.unreachable_since is not None and time.monotonic() - self.unreachable_since < self.retry_s
        if waiting and not force:
            return
        while self.pending:
            record = self.pending[0]
            try:
                record.write(self)
            except TRACKING_FAILURES as error:
                if not self._server_down():
                    raise  # the server answers: a real error (bad value, permissions), not an outage
                self._report_outage(error)
                return
            self.pending.pop(0)
        if self.unreachable_since is not None:
            print(f"ssl-tune: MLflow at {self.tracking_uri} is reachable again; queued records logged.", flush=True)
            self.unreachable_since, self.warned = None, set()

    def _server_down(self) -> bool:
        try:
            check_reachable(self.tracking_uri)
        except TrackingError:
            return True
        return False

    def _report_outage(self, error: Exception) -> None:
        """Say once per trial, not once per failed call, that its logging waits for the server."""
        self.unreachable_since = time.monotonic()
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        for trial_id in dict.fromkeys(r.trial for r in self.pending):
            if trial_id not in self.warned:
                self.warned.add(trial_id)
                print(f"ssl-tune: MLflow at {self.tracking_uri} unreachable ({first_line}); trial {trial_id} keeps "
                      f"training and its logging is queued, retried every {self.retry_s:.0f} s", flush=True)

    def open_run(self, trial_id: str, start: TrialStarted | None = None) -> str:
        """The trial's child run id, created (or found again) on its first record; a new run gets the artifacts."""
        if trial_id in self.runs and start is None:
            return self.runs[trial_id]
        start = start or TrialStarted(trial_id, {}, {}, [])
        run_name = start.tags.get(MLFLOW_RUN_NAME, f"trial-{trial_id}")
        run_id, new = self.tracker.trial_run(trial_id, run_name, start.params, start.tags)
        if new:
            for path in start.artifacts:
                self.tracker.client.log_artifact(run_id, path)
        self.runs[trial_id] = run_id
        return run_id
