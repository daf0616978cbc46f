"""How a run or a trial ended (or that it is still running): one vocabulary for the loop, Tune and MLflow.

A ``StrEnum``: each member equals its string (``Status.FINISHED == "finished"``), so it is written to
``metrics.jsonl``, Tune results and MLflow tags as plain text and read back from them as such.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"  # trained every epoch
    DIVERGED = "diverged"  # a non-finite loss
    COLLAPSED = "collapsed"  # embedding std below eval.collapse_threshold
    PRUNED = "pruned"  # stopped early by ASHA
    TIME_LIMIT = "time_limit"  # stopped at the trial time limit
    BUDGET = "budget"  # stopped when the sweep's time budget ended
    FAILED = "failed"  # raised an error
