"""How a trial ended, in ssl-tune's words (finished, pruned, diverged, ...), from its last result.

Light on purpose: trial processes import it (through :mod:`tuning.progress`), and MLflow, Optuna and SciPy stay out
of them.
"""

from __future__ import annotations

from typing import Any

from ssl_train.status import Status

RANKED_BY = "val {objective} at last epoch"  # what ranks trials and picks confirmation's candidates, as printed


def trial_outcome(last_result: dict[str, Any], time_limit_s: float | None) -> tuple[str, str]:
    """ssl-tune's status of a trial that ended, and why, from its last result."""
    status = last_result.get("status", Status.RUNNING)
    epoch = last_result.get("epoch", 0)
    if status == Status.FINISHED:
        return Status.FINISHED, f"trained all {epoch} epochs"
    if status == Status.DIVERGED:
        return Status.DIVERGED, f"non-finite loss in epoch {epoch}"
    if status == Status.COLLAPSED:
        std = last_result.get("embedding_std", 0)
        return Status.COLLAPSED, f"embedding std {std:.3f} below threshold at epoch {epoch}"
    if time_limit_s and last_result.get("time_total_s", 0) >= time_limit_s:
        return Status.TIME_LIMIT, f"stopped at the trial time limit of {time_limit_s:.0f} s after epoch {epoch}"
    return Status.PRUNED, f"stopped early by ASHA after epoch {epoch}"
