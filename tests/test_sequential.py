"""Sequential confirmation (--confirm-seeds auto): the spending function, the boundaries, the stopping rule, the
error rate under no difference by simulation, and how a confirmation with rounds picks and judges its winner."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tuning.confirm import Confirmation
from tuning.sequential import (
    ALPHA,
    boundaries,
    false_better_rate,
    look,
    obf_spending,
    seed_looks,
)

LOOKS = seed_looks()


def test_the_looks_are_three_seeds_then_two_more_up_to_ten():
    assert LOOKS == (3, 5, 7, 9, 10)
    assert seed_looks(cap=4) == (3, 4)
    with pytest.raises(ValueError, match="first"):
        seed_looks(cap=2, first=3)


def test_the_spending_function_matches_lan_demets_obrien_fleming_on_worked_values():
    # alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t)): z_{0.9875} = 2.2414
    assert obf_spending(1.0) == pytest.approx(ALPHA)
    assert obf_spending(0.5) == pytest.approx(2 - 2 * stats.norm.cdf(2.241403 / math.sqrt(0.5)), rel=1e-5)
    assert obf_spending(0.5) == pytest.approx(0.00153, abs=1e-5)
    assert obf_spending(0.0) == 0.0
    spent = [obf_spending(n / 10) for n in LOOKS]
    assert spent == sorted(spent)  # spending only grows


def test_one_look_has_the_fixed_designs_t_boundary():
    # One look spends all of alpha: the bound is the one-sided t quantile (the 95 % two-sided interval's).
    (bound,) = boundaries((3,))
    assert bound == pytest.approx(stats.t.isf(ALPHA, 2), rel=0.02)
    (bound,) = boundaries((10,))
    assert bound == pytest.approx(stats.t.isf(ALPHA, 9), rel=0.01)


def test_early_looks_are_strict_and_the_last_is_close_to_the_fixed_bound():
    bounds = boundaries(LOOKS)
    assert list(bounds) == sorted(bounds, reverse=True)
    assert bounds[0] > 10 * stats.t.isf(ALPHA, 2)  # 3 seeds almost never stop: O'Brien-Fleming spends ~0 there
    assert stats.t.isf(ALPHA, 9) < bounds[-1] < 1.2 * stats.t.isf(ALPHA, 9)


def test_under_no_difference_the_false_better_rate_stays_at_the_nominal_rate():
    simulations = 200_000
    tolerance = 3 * math.sqrt(ALPHA * (1 - ALPHA) / simulations)  # Monte Carlo noise of the estimate
    for seed in (1, 2):  # the boundaries were placed with another seed
        assert false_better_rate(LOOKS, simulations, seed) <= ALPHA + tolerance
        assert false_better_rate(LOOKS, simulations, seed, min_effect=-math.inf) <= ALPHA + tolerance


def test_looking_at_every_round_with_the_fixed_interval_would_inflate_the_error():
    # What the bound prevents: testing each look at the fixed one-look t bound says "better" far too often.
    draws = np.random.default_rng(3).standard_normal((100_000, 10))
    better = np.zeros(len(draws), dtype=bool)
    for n in LOOKS:
        d = draws[:, :n]
        better |= d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n)) >= stats.t.isf(ALPHA, n - 1)
    assert better.mean() > 2 * ALPHA


def test_a_look_stops_when_better_continues_when_undecided_and_stops_at_the_cap():
    clear = look([0.030, 0.031, 0.029, 0.030, 0.032], LOOKS)
    assert clear.better and clear.stop and "better at look 2 of 5" in clear.reason
    undecided = look([0.03, -0.01, 0.02], LOOKS)
    assert not undecided.better and not undecided.stop and undecided.low < 0 < undecided.high
    half = boundaries(LOOKS)[0] * np.std([0.03, -0.01, 0.02], ddof=1) / math.sqrt(3)
    assert undecided.low == pytest.approx(np.mean([0.03, -0.01, 0.02]) - half)  # the repeated interval
    futile = look([0.01, -0.01, 0.0], LOOKS, min_effect=0.005)
    assert futile.stop and not futile.better and "minimum effect" in futile.reason
    capped = look([0.03, -0.02, 0.01, 0.0, 0.02, -0.01, 0.01, 0.02, -0.02, 0.01], LOOKS)
    assert capped.stop and not capped.better and "seed cap (10)" in capped.reason
    with pytest.raises(ValueError, match="planned looks"):
        look([0.1, 0.2, 0.3, 0.4], LOOKS)


def rounds(winner_tests: list[float], default_tests: list[float], other_val: float = 0.80) -> pd.DataFrame:
    """A confirmation with rounds: trial_a and the default have every seed; trial_b only the first round's 3."""
    rows = [{"candidate": "trial_a", "seed": s, "val": 0.85, "test": t, "status": "finished"}
            for s, t in enumerate(winner_tests)]
    rows += [{"candidate": "default", "seed": s, "val": 0.80, "test": t, "status": "finished"}
             for s, t in enumerate(default_tests)]
    rows += [{"candidate": "trial_b", "seed": s, "val": other_val, "test": 0.5, "status": "finished"}
             for s in range(3)]
    return pd.DataFrame(rows)


def test_a_confirmation_with_rounds_keeps_its_first_round_winner_and_names_the_seeds_it_used():
    winner = [0.83, 0.85, 0.84, 0.86, 0.84]
    default = [0.80, 0.81, 0.80, 0.81, 0.80]
    # trial_b's 3-seed val beats trial_a's 5-seed mean only if later rounds counted: they must not.
    data = rounds(winner, default, other_val=0.84)
    data.loc[(data["candidate"] == "trial_a") & (data["seed"] >= 3), "val"] = 0.80
    confirmation = Confirmation(data, "knn_acc", LOOKS)
    assert confirmation.winner == "trial_a"
    decided = confirmation.decision()
    assert decided is not None and decided.seeds == 5 and decided.better
    text = confirmation.format({})
    assert "seeds: 5 of at most 10; stopped: better at look 2 of 5" in text
    assert "O'Brien-Fleming alpha spending, look 2 of 5" in text and "5 seeds each" in text
    assert confirmation.margin().low == pytest.approx(decided.low)


def test_an_undecided_first_round_asks_for_more_seeds_and_fixed_seeds_never_do():
    data = rounds([0.83, 0.80, 0.84], [0.80, 0.81, 0.80])
    assert not Confirmation(data, "knn_acc", LOOKS).decision().stop
    assert Confirmation(data, "knn_acc").decision() is None  # --confirm-seeds 3: one round, the fixed interval
