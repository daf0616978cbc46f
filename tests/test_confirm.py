"""Confirmation arithmetic on fixed numbers: which configs, the grid of runs, the paired and Welch intervals and
the verdict."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from search_spaces import load_space
from tuning.confirm import (
    DEFAULT_CANDIDATE,
    Confirmation,
    Margin,
    candidates,
    confirmation_grid,
    paired_margin,
    welch_margin,
)


def test_welch_interval_matches_the_formula_on_fixed_numbers():
    winner, default = [0.80, 0.82, 0.84], [0.70, 0.71, 0.75]
    margin = welch_margin(winner, default)
    assert margin.difference == pytest.approx(0.82 - 0.72)
    # Welch by hand: s1^2 = 4e-4, s2^2 = 7e-4, se = sqrt((4e-4 + 7e-4) / 3), df by Welch-Satterthwaite.
    v1, v2 = 4e-4 / 3, 7e-4 / 3
    se = math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / 2 + v2**2 / 2)
    assert df == pytest.approx(3.7231, abs=1e-3)
    from scipy import stats

    half = stats.t.ppf(0.975, df) * se
    assert (margin.low, margin.high) == pytest.approx((0.10 - half, 0.10 + half))
    assert margin.low == pytest.approx(0.0452, abs=1e-3) and margin.significant


def test_paired_interval_matches_a_hand_computation():
    """The issue's per-seed differences +9.2, +5.0, +7.8 points: Welch's interval includes 0, the paired one does not.

    d = (0.092, 0.050, 0.078): mean 0.0733, sd 0.021385, se = sd / sqrt(3) = 0.012347,
    t_{0.975, 2} = 4.302653, half-width 0.053124 -> [0.0202, 0.1265].
    """
    winner, default = [0.880, 0.830, 0.852], [0.788, 0.780, 0.774]
    paired = paired_margin(winner, default)
    assert paired.method == "paired t"
    assert paired.difference == pytest.approx(0.073333, abs=1e-6)
    assert (paired.low, paired.high) == pytest.approx((0.073333 - 0.053124, 0.073333 + 0.053124), abs=1e-5)
    assert paired.significant
    welch = welch_margin(winner, default)
    assert welch.method == "Welch's t" and welch.difference == pytest.approx(paired.difference)
    assert welch.high - welch.low > paired.high - paired.low
    with pytest.raises(ValueError, match="one default score per winner score"):
        paired_margin([0.8, 0.9], [0.7])


def test_confirmation_pairs_by_seed_and_falls_back_to_welch_when_seeds_differ():
    def runs(default_status: str) -> pd.DataFrame:
        return pd.DataFrame([
            *[{"candidate": "trial_a", "seed": s, "val": 0.9, "test": t, "status": "finished"}
              for s, t in zip((10, 11, 12), (0.880, 0.830, 0.852), strict=True)],
            # the default's rows in another order: pairing is by seed, not by row
            *[{"candidate": "default", "seed": s, "val": 0.8, "test": t,
               "status": default_status if s == 11 else "finished"}
              for s, t in zip((12, 10, 11), (0.774, 0.788, 0.780), strict=True)],
        ])

    paired = Confirmation(runs("finished"), "knn_acc")
    assert paired.margin().method == "paired t"
    assert paired.margin().low == pytest.approx(0.073333 - 0.053124, abs=1e-5)
    assert "(paired t, 3 seeds each)" in paired.format({})
    unpaired = Confirmation(runs("failed"), "knn_acc")  # seed 11 of the default failed: no pair for it
    assert unpaired.margin().method == "Welch's t"
    assert "(Welch's t," in unpaired.format({})


def test_an_interval_that_includes_zero_is_not_a_win_and_one_seed_gives_none():
    overlap = welch_margin([0.80, 0.70, 0.90], [0.78, 0.75, 0.80])
    assert overlap.low < 0 < overlap.high and not overlap.significant
    assert "NOT better than the default at 95 %" in overlap.verdict("trial_a")
    single = welch_margin([0.9], [0.8])
    assert single.difference == pytest.approx(0.1) and math.isinf(single.low) and not single.significant
    assert "cannot tell" in single.verdict("trial_a")
    assert "default config is the winner" in Margin(0.0, -1, 1).verdict(DEFAULT_CANDIDATE)
    assert "is better than the default at 95 %" in Margin(0.05, 0.01, 0.09).verdict("trial_a")


def test_the_winner_is_chosen_on_val_never_on_test():
    runs = pd.DataFrame([
        # candidate, seed, val, test: trial_b has the better test, trial_a the better val.
        *[{"candidate": "trial_a", "seed": s, "val": 0.90, "test": 0.70, "status": "finished"} for s in range(3)],
        *[{"candidate": "trial_b", "seed": s, "val": 0.80, "test": 0.95, "status": "finished"} for s in range(3)],
        *[{"candidate": "default", "seed": s, "val": 0.85, "test": 0.75 + 0.01 * s, "status": "finished"}
          for s in range(3)],
        {"candidate": "trial_b", "seed": 3, "val": 0.99, "test": 0.99, "status": "failed"},  # not counted
    ])
    confirmation = Confirmation(runs, "knn_acc")
    assert confirmation.winner == "trial_a"
    summary = confirmation.summary()
    assert list(summary["candidate"]) == ["trial_a", "default", "trial_b"] and list(summary["seeds"]) == [3, 3, 3]
    assert confirmation.margin().difference == pytest.approx(0.70 - 0.76)
    text = confirmation.format({"raw pixels": (0.91, 0.0)})
    assert "baseline raw pixels: test 0.9100" in text and "winner (best mean val): trial_a" in text


def test_candidates_are_the_default_plus_the_top_k_full_budget_trials():
    space = load_space("byol")
    table = pd.DataFrame([  # best first, as load_report sorts it
        {"trial": "p", "status": "pruned", "is_default": False, "optim.lr": 0.009},
        {"trial": "d", "status": "finished", "is_default": True, "optim.lr": 0.002},
        {"trial": "a", "status": "finished", "is_default": False, "optim.lr": 0.004},
        {"trial": "b", "status": "finished", "is_default": False, "optim.lr": 0.001},
    ])
    chosen = candidates(table, space, top_k=1)
    assert list(chosen) == [DEFAULT_CANDIDATE, "trial_a"]  # pruned and default trials are not among the K
    assert chosen[DEFAULT_CANDIDATE] == {"method": "byol"} and chosen["trial_a"]["optim.lr"] == 0.004
    grid = confirmation_grid(chosen, seeds=range(3), base_seed=10)
    assert len(grid) == 2 * 3
    assert [g["overrides"]["seed"] for g in grid] == [10, 11, 12, 10, 11, 12]
    assert all(g["overrides"]["eval.test_at_end"] is True for g in grid)


def test_a_confirmation_where_no_run_finished_says_so_instead_of_crashing():
    runs = pd.DataFrame([{"candidate": c, "seed": s, "val": None, "test": None, "status": "failed"}
                         for c in ("default", "trial_a") for s in range(2)])
    text = Confirmation(runs, "knn_acc").format({})
    assert text.startswith("no confirmation run finished (4 ended as failed)") and "no winner" in text


def test_a_baseline_that_beats_every_config_is_said_in_words():
    runs = pd.DataFrame([{"candidate": c, "seed": s, "val": 0.8, "test": t, "status": "finished"}
                         for c, t in (("default", 0.86), ("trial_a", 0.87)) for s in range(2)])
    text = Confirmation(runs, "knn_acc").format({"raw pixels": (0.978, 0.0), "random-init backbone": (0.857, 0.007)})
    assert "the baseline raw pixels beats every confirmed config on test (best 0.8700)" in text
    assert "the baseline random-init backbone beats" not in text
