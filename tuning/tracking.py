"""MLflow tracking of a sweep: one parent run per sweep, one nested child run per trial.

All logging happens on the Tune driver (a :class:`ray.tune.Callback`), so only the driver
must reach the tracking server, concurrency is a non-issue, and a resumed sweep finds its
parent and children again by tag instead of creating new ones.
"""

from __future__ import annotations

import math
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback
from ray.tune.experiment import Trial

SWEEP_TAG = "ssl_tune.sweep"
TRIAL_TAG = "ssl_tune.trial_id"
STATUS_TAG = "ssl_tune.status"
REASON_TAG = "ssl_tune.reason"
DEFAULT_TAG = "ssl_tune.is_default_config"
DEFAULT_EXPERIMENT = "ssl-tune"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and what to do."""


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


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any trial starts, when an HTTP tracking server does not answer."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        problem = str(getattr(error, "reason", error))
    raise TrackingError(
        f"MLflow tracking server {tracking_uri} is not reachable ({problem}); start it "
        f"(`mlflow server --host 127.0.0.1 --port PORT`) or pass --tracking-uri for one that runs"
    )


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
        mlflow_status = {"finished": "FINISHED", "pruned": "KILLED", "time_limit": "KILLED"}.get(status, "FAILED")
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
                STATUS_TAG: "running", **tags}
        return self.create_run(run_name, params, tags), True

    def drop_runs_except(self, trial_ids: set[str]) -> list[str]:
        """Delete child runs of trials Tune does not know (started after its last state save, then a crash).

        Tune re-suggests such a trial under a new id, so keeping its run would show a trial
        the sweep never finished and does not count. Returns the dropped trial ids.
        """
        where = f"tags.`{SWEEP_TAG}` = '{self.sweep_name}' and tags.`{TRIAL_TAG}` != 'sweep'"
        dropped = []
        for run in self.client.search_runs([self.experiment_id], where, max_results=10_000):
            if run.data.tags[TRIAL_TAG] not in trial_ids:
                self.client.delete_run(run.info.run_id)
                dropped.append(run.data.tags[TRIAL_TAG])
        if dropped:
            print(f"ssl-tune: removed MLflow runs of {len(dropped)} trial(s) lost in the crash: {', '.join(dropped)}")
        return dropped

class MLflowSweepCallback(Callback):
    """Mirror a Tune sweep into MLflow from the driver: a child run per trial, metrics per epoch, final status.

    The MLflow client is made in ``setup`` (not pickled with the experiment state), so a
    restored sweep reconnects and reattaches to its parent and child runs.
    """

    def __init__(
        self,
        tracking_uri: str,
        sweep_name: str,
        experiment: str,
        describe_trial: Callable[[Trial], tuple[dict[str, Any], dict[str, str], list[Path]]],
        sweep_tags: dict[str, str],
        sweep_params: dict[str, Any],
        trial_time_limit_s: float | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.sweep_name = sweep_name
        self.experiment = experiment
        self.describe_trial = describe_trial
        self.sweep_tags = sweep_tags
        self.sweep_params = sweep_params
        self.trial_time_limit_s = trial_time_limit_s
        self.tracker: SweepTracker | None = None
        self.runs: dict[str, str] = {}
        self.reconciled = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tracker": None, "runs": {}, "reconciled": False}

    def setup(self, **info: Any) -> None:
        self.tracker = SweepTracker(self.tracking_uri, self.sweep_name, self.experiment)
        self.tracker.open_parent(self.sweep_tags, self.sweep_params)

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if not self.reconciled:
            self.reconciled = True
            self.tracker.drop_runs_except({trial.trial_id for trial in trials})

    def _run_of(self, trial: Trial) -> str:
        if trial.trial_id not in self.runs:
            params, tags, artifacts = self.describe_trial(trial)
            run_id, new = self.tracker.trial_run(trial.trial_id, f"trial-{trial.trial_id}", params, tags)
            if new:
                for path in artifacts:
                    self.tracker.client.log_artifact(run_id, str(path))
            self.runs[trial.trial_id] = run_id
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._run_of(trial)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self.tracker.log_epoch(self._run_of(trial), result, step, int(result.get("timestamp", 0) * 1000))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        status, reason = trial_outcome(trial.last_result or {}, self.trial_time_limit_s)
        self.tracker.end_run(self._run_of(trial), status, reason)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        error = getattr(trial, "error_file", None) or "see the trial's error.txt in the sweep directory"
        self.tracker.end_run(self._run_of(trial), "failed", f"trial raised an error: {error}")


def trial_outcome(last_result: dict[str, Any], time_limit_s: float | None) -> tuple[str, str]:
    """ssl-tune's status of a trial that ended, and why, from its last result."""
    status = last_result.get("status", "running")
    epoch = last_result.get("epoch", 0)
    if status == "finished":
        return "finished", f"trained all {epoch} epochs"
    if status == "diverged":
        return "diverged", f"non-finite loss in epoch {epoch}"
    if status == "collapsed":
        return "collapsed", f"embedding std {last_result.get('embedding_std', 0):.3f} below threshold at epoch {epoch}"
    if time_limit_s and last_result.get("time_total_s", 0) >= time_limit_s:
        return "time_limit", f"stopped at the trial time limit of {time_limit_s:.0f} s after epoch {epoch}"
    return "pruned", f"stopped early by ASHA after epoch {epoch}"
