"""Stopping a sweep well: Ctrl-C and SIGTERM stop it resumably, and a stage none of whose trials starts fails
with a line that says what to do."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

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
