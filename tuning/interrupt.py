"""Stopping a sweep well: Ctrl-C and SIGTERM stop it resumably, a stage none of whose trials starts fails with a
line that says what to do, and a driver killed while Tune writes its state still resumes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import ray.cloudpickle as cloudpickle
from ray import tune
from ray.tune.experiment import Trial


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


STATE_FILES = "experiment_state-*.json"  # Tune's record of an experiment; the newest is what a restore reads
COMPLETE_COPY = ".complete"  # the suffix of ExperimentStateCopy's copy (not matched by STATE_FILES)
SEARCH_GENERATOR_FILES = "search_gen_state-*.json"  # Tune's SearchGenerator state (a pickle despite the name)


def _newest_state(experiment: str) -> Path | None:
    """The newest state file of a local experiment folder; None for a storage URI or a folder not yet written."""
    folder = None if "://" in experiment else Path(experiment)
    files = sorted(folder.glob(STATE_FILES)) if folder and folder.is_dir() else []  # named by session start time
    return files[-1] if files else None


def _is_complete(text: bytes) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class ExperimentStateCopy(tune.Callback):
    """Keeps a copy of the Tune experiment's newest complete state file beside it (a local experiment folder).

    Tune rewrites that file in place; a driver killed while it is written leaves it cut off, and the sweep could not
    resume (seen once in CI: an empty file after a SIGKILL). :func:`repair_experiment_state` puts the copy back.
    """

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment
        self.copied: tuple[str, int] | None = None

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        newest = _newest_state(self.experiment)
        if newest is None or (stamp := (newest.name, newest.stat().st_mtime_ns)) == self.copied:
            return
        text = newest.read_bytes()
        if _is_complete(text):  # else it is being written: a later step copies it
            _write_whole(newest.with_name(newest.name + COMPLETE_COPY), text)
            self.copied = stamp


def repair_experiment_state(experiment: str) -> str | None:
    """Before a restore: put back the complete copy of a state file that a kill cut off; a line saying so, or None
    when there was nothing to repair. A cut-off file without a copy is refused with what to do."""
    newest = _newest_state(experiment)
    if newest is None or _is_complete(newest.read_bytes()):
        return None
    copy = newest.with_name(newest.name + COMPLETE_COPY)
    if not copy.is_file():
        raise RuntimeError(f"{newest}: Tune's record of this sweep was cut off when it stopped, and no complete copy "
                           "exists; start a new sweep (MLflow and the Optuna study keep what ran)")
    os.replace(copy, newest)
    _forget_unrecorded_trials(newest)
    return (f"{newest.name} was cut off when the sweep stopped: restored its last complete copy (trials that ran "
            "after it continue from their checkpoints)")


def _forget_unrecorded_trials(state_file: Path) -> None:
    """After a state file is put back: the search generator's state, which Tune writes after the state file (and may
    have written for the later, cut-off save), forgets the trials the restored record lacks: its count of created
    trials, and its concurrency limiter's running set, which would otherwise wait forever for a trial that no
    longer exists (CI saw a resumed sweep hang so)."""
    recorded = {json.loads(trial[0])["trial_id"] for trial in json.loads(state_file.read_text())["trial_data"]}
    for path in state_file.parent.glob(SEARCH_GENERATOR_FILES):
        state = cloudpickle.loads(path.read_bytes())
        state["counter"] = min(state["counter"], len(recorded))
        limiter = state.get("name:ConcurrencyLimiter")
        if limiter is not None:
            limiter["live_trials"] &= recorded
            limiter["num_unfinished_live_trials"] = len(limiter["live_trials"])
        _write_whole(path, cloudpickle.dumps(state))


def _write_whole(path: Path, data: bytes) -> None:
    """Write ``path`` so that a kill leaves the old file or the new one, never a part: beside it, then renamed."""
    staged = path.with_name(path.name + ".partial")
    staged.write_bytes(data)
    os.replace(staged, path)


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
