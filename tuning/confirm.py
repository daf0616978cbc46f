"""Confirmation: the top configs of a search and the default, re-trained with several seeds, judged on test.

The search selects on the val split, so the val score of its best trial is optimistic (it is the
maximum of many noisy values). Confirmation re-trains each of the top-K configs and the base
config at the full epoch budget with S seeds (a seed changes the initial weights, the data order
and the augmentations), picks the winner by its mean **val** score, and only then reads the
**test** split: the test mean ± std of each config, and the winner's margin over the default with
a 95 % interval (Welch's t over seeds). This module holds the pure parts: which configs, the grid of
runs, and the arithmetic; :mod:`tuning.sweep` runs the grid as Tune trials.

With a label-free objective (``rankme``) the winner is picked by its mean val RankMe; where the data has labels,
test is still read as kNN accuracy (:func:`metric_on_test`). Data with no labels has no test split: the summary then
holds val RankMe only, and there is no margin (:attr:`Confirmation.accuracy_measured`).

Every config is trained with the same seeds (``base_seed + i``): seed i of the winner and seed i of the
default start from the same initial weights, data order and augmentation stream. The margin then uses
the per-seed differences (a paired t interval), which removes the spread the seeds share; Welch's t over
the two groups is the fallback when the configs do not have the same finished seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ssl_train.status import Status
from tuning.sequential import Look, look

DEFAULT_CANDIDATE = "default"


def metric_on_test(objective: str) -> str:
    """What confirmation reads on test: linear accuracy for ``linear_acc``, else kNN accuracy (the vote's share
    ``knn_prob`` and the label-free scores choose among runs; on test, accuracy is what a user needs to know)."""
    return "linear_acc" if objective == "linear_acc" else "knn_acc"


def candidates(table: pd.DataFrame, space: Any, top_k: int) -> dict[str, dict[str, Any]]:
    """The space's fixed values alone (the default config) and with the searched values of the ``top_k``
    best full-budget search trials (a PBT member's: its start values and its schedule, the members that have one).

    ``table`` holds the search trials best first (:func:`tuning.report.load_report`). Only trials that
    trained every epoch qualify (a pruned trial's value is of fewer epochs); the default trial is
    not counted among the K, so there are always K + 1 configs when the search finished K others.
    """
    chosen: dict[str, dict[str, Any]] = {DEFAULT_CANDIDATE: dict(space.fixed)}
    finished = table[(table["status"] == Status.FINISHED) & ~table["is_default"]]
    if "schedule" in finished:  # a PBT search: a member that never copied another trained the default's values
        finished = finished[finished["schedule"].map(bool)]
    for _, row in finished.head(top_k).iterrows():
        searched = {key: _native(row[key]) for key in space.searched_keys() if key in row and _present(row[key])}
        scheduled = {"schedule": row["schedule"]} if "schedule" in row else {}
        chosen[f"trial_{row['trial']}"] = {**space.fixed, **searched, **scheduled}
    return chosen


def _present(value: Any) -> bool:
    """False for the NaN a conditional parameter leaves in the table when the trial did not sample it."""
    return isinstance(value, (list, tuple, str)) or not pd.isna(value)


def _native(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def confirmation_grid(chosen: dict[str, dict[str, Any]], seeds: range, base_seed: int) -> list[dict[str, Any]]:
    """One entry per (config, seed index in ``seeds``): the Tune grid of a confirmation round."""
    return [
        {"candidate": name, "seed_index": index,
         "overrides": {**overrides, "seed": base_seed + index, "eval.test_at_end": True}}
        for name, overrides in chosen.items()
        for index in seeds
    ]


@dataclass
class Margin:
    """Winner minus default on test: the mean difference and its 95 % interval (paired or Welch's t)."""

    difference: float
    low: float
    high: float
    method: str = "Welch's t"

    @property
    def significant(self) -> bool:
        """Better than the default at 95 %: the whole interval lies above 0."""
        return self.low > 0

    def verdict(self, winner: str) -> str:
        if winner == DEFAULT_CANDIDATE:
            return "verdict: the default config is the winner; the search found nothing better on val"
        if not math.isfinite(self.low):
            return (f"verdict: cannot tell; {winner} leads by {self.difference:+.4f} on test, "
                    "but one seed per config gives no interval (use --confirm-seeds 3 or more)")
        if self.significant:
            return f"verdict: {winner} is better than the default at 95 % ({self.difference:+.4f} on test)"
        return (f"verdict: {winner} is NOT better than the default at 95 % "
                f"(interval [{self.low:+.4f}, {self.high:+.4f}] includes 0)")


def welch_margin(winner: list[float], default: list[float], confidence: float = 0.95) -> Margin:
    """Mean(winner) - mean(default) with Welch's t interval; an infinite interval when either has 1 value."""
    a, b = np.asarray(winner, dtype=float), np.asarray(default, dtype=float)
    difference = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Margin(difference, -math.inf, math.inf)
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:  # identical seeds: no spread, the interval is the point
        return Margin(difference, difference, difference)
    interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return Margin(difference, float(interval.low), float(interval.high))


def paired_margin(winner: list[float], default: list[float], confidence: float = 0.95) -> Margin:
    """Mean of the per-seed differences ``winner[i] - default[i]`` with the paired t interval
    ``mean(d) ± t_{n-1} sd(d) / sqrt(n)``; an infinite interval with fewer than 2 pairs."""
    if len(winner) != len(default):
        raise ValueError(f"a paired interval needs one default score per winner score, got {len(winner)} "
                         f"and {len(default)}")
    d = np.asarray(winner, dtype=float) - np.asarray(default, dtype=float)
    difference = float(d.mean()) if len(d) else math.nan
    if len(d) < 2:
        return Margin(difference, -math.inf, math.inf, "paired t")
    if d.var(ddof=1) == 0:  # the same difference at every seed: the interval is the point
        return Margin(difference, difference, difference, "paired t")
    interval = stats.ttest_1samp(d, 0.0).confidence_interval(confidence)
    return Margin(difference, float(interval.low), float(interval.high), "paired t")


def seed_margin(winner: pd.Series, default: pd.Series, confidence: float = 0.95) -> Margin:
    """Winner minus default from test scores indexed by seed: paired t when both have the same seeds,
    Welch's t otherwise (a seed failed or is missing on one side)."""
    if len(winner) >= 2 and set(winner.index) == set(default.index):
        seeds = sorted(winner.index)
        return paired_margin(winner[seeds].tolist(), default[seeds].tolist(), confidence)
    return welch_margin(winner.tolist(), default.tolist(), confidence)


@dataclass
class Confirmation:
    """The confirmation runs of one sweep, summarised per config."""

    runs: pd.DataFrame  # one row per run: candidate, seed, val, test (NaN: not measured), status, run_id
    objective: str  # e.g. "knn_acc": the runs' val_<objective>, and test_<metric_on_test(objective)>
    looks: tuple[int, ...] | None = None  # --confirm-seeds auto: the seed counts at which the margin is tested
    min_effect: float = 0.0  # with looks: stop adding seeds once the margin is at or below this

    @property
    def test_metric(self) -> str:
        return metric_on_test(self.objective)

    @property
    def accuracy_measured(self) -> bool:
        """False when no run has a test score: the data has no labels, so nothing but val RankMe was measured."""
        return bool(self.runs["test"].notna().any())

    def summary(self) -> pd.DataFrame:
        """Per config: mean and std of val and test over its seeds, best mean val first."""
        finished = self.runs[self.runs["status"] == Status.FINISHED]
        grouped = finished.groupby("candidate").agg(
            seeds=("seed", "count"), val_mean=("val", "mean"), val_std=("val", "std"),
            test_mean=("test", "mean"), test_std=("test", "std"),
        )
        return grouped.sort_values("val_mean", ascending=False).reset_index()

    @property
    def winner(self) -> str:
        """The config with the best mean val over its seeds (test plays no part in the choice); with sequential
        seeds, over the first round's, which every config has (later rounds add seeds to the winner and the start
        only, and must not change which is the winner)."""
        if self.looks is None:
            return str(self.summary().iloc[0]["candidate"])
        first = sorted(self.runs["seed"].unique())[:self.looks[0]]
        finished = self.runs[(self.runs["status"] == Status.FINISHED) & self.runs["seed"].isin(first)]
        return str(finished.groupby("candidate")["val"].mean().idxmax())

    def decision(self) -> Look | None:
        """With sequential seeds and a paired margin: what the look at the winner's seeds decided (None otherwise,
        or when the seeds so far are not a planned look, as after a failed run)."""
        if self.looks is None or not self.accuracy_measured or self.winner == DEFAULT_CANDIDATE:
            return None
        winner, default = self.scores(self.winner), self.scores(DEFAULT_CANDIDATE)
        if set(winner.index) != set(default.index) or len(winner) not in self.looks:
            return None
        seeds = sorted(winner.index)
        return look((winner[seeds] - default[seeds]).tolist(), self.looks, self.min_effect)

    def scores(self, candidate: str, split: str = "test") -> pd.Series:
        """The finished runs' ``split`` scores (``test`` or ``val``) of ``candidate``, indexed by seed."""
        rows = self.runs[(self.runs["candidate"] == candidate) & (self.runs["status"] == Status.FINISHED)]
        return rows.set_index("seed")[split]

    def margin(self) -> Margin | None:
        """The winner's test margin over the default; None when no accuracy was measured (no labels)."""
        if not self.accuracy_measured:
            return None
        decided = self.decision()
        if decided is not None:
            return Margin(decided.difference, decided.low, decided.high,
                          f"paired t, O'Brien-Fleming alpha spending, look {self.looks.index(decided.seeds) + 1} of "
                          f"{len(self.looks)}")
        return seed_margin(self.scores(self.winner), self.scores(DEFAULT_CANDIDATE))

    def table(self) -> str:
        """The per-config summary as printed, its columns named for the metrics they hold; without labels, val
        only."""
        table = self.summary()
        if not self.accuracy_measured:
            table = table.drop(columns=["test_mean", "test_std"])
        names = {f"{split}_{stat}": f"{split}_{metric}_{stat}" for split, metric in
                 (("val", self.objective), ("test", self.test_metric)) for stat in ("mean", "std")}
        return table.rename(columns=names).to_string(index=False, float_format=lambda v: f"{v:.4f}")

    def format(self, baselines: dict[str, tuple[float, float]]) -> str:
        """The table, the baselines, the margin and the verdict, as printed at the end of a sweep; without labels,
        the val RankMe of each config and a plain statement that no accuracy was measured."""
        summary = self.summary()
        if summary.empty:
            return (f"no confirmation run finished ({len(self.runs)} ended as "
                    f"{', '.join(sorted(set(map(str, self.runs['status']))))}): no winner, no margin; see sweep.log")
        lines = [self.table(), ""]
        seeds = int(summary["seeds"].min())
        chosen_by = "val" if self.objective == self.test_metric else f"val {self.objective}"
        margin = self.margin()
        if margin is None:
            best = self.scores(self.winner, "val")
            lines += [f"winner (best mean {chosen_by}): {self.winner}, {self.objective} {best.mean():.2f} ± "
                      f"{best.std():.2f} over {len(best)} seeds",
                      "no accuracy was measured: the data has no labels, so there is no test split, kNN or linear "
                      f"probe; {self.objective} compares runs of one method, it is not an accuracy"]
            return "\n".join(lines)
        best_test = float(summary["test_mean"].max())
        for name, (mean, std) in baselines.items():
            lines.append(f"baseline {name}: test {mean:.4f}" + (f" ± {std:.4f}" if std else ""))
            if mean > best_test:
                lines.append(f"  the baseline {name} beats every confirmed config on test (best {best_test:.4f}): "
                             "self-supervised training at this budget does not help these images yet")
        seeds = len(self.scores(self.winner)) if self.looks else seeds
        lines.append(f"winner (best mean {chosen_by}): {self.winner}; margin over the default on test "
                     f"{self.test_metric}: {margin.difference:+.4f}, 95 % interval [{margin.low:+.4f}, "
                     f"{margin.high:+.4f}] ({margin.method}, {seeds} seeds each)")
        decided = self.decision()
        if decided is not None:
            lines.append(f"seeds: {decided.seeds} of at most {self.looks[-1]}; stopped: {decided.reason}")
        lines.append(margin.verdict(self.winner))
        return "\n".join(lines)
