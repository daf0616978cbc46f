"""The sweep's second search mode: Population Based Augmentation (Ho et al., ICML 2019), with Ray Tune's
``PopulationBasedTraining`` (Jaderberg et al. 2017).

A population of trials starts from the base recipe, one seed each, as PBA starts every member from its initial
policy. Every ``--perturb-every`` epochs, a member in the bottom quantile of the val objective copies a top member's
checkpoint (weights, optimiser, EMA target: the whole training state) and explores its values: each searched knob
is resampled from the space (probability 0.25) or perturbed, a number by x0.8 or x1.2 (clipped to the space), a
choice to a neighbour in the listed order. What a member trained with, epoch by epoch, is its lineage: the start
values plus one schedule step per exploit (:func:`continue_lineage`), carried in its checkpoints' config, so the best
member ends holding a ``schedule:`` that ``ssl-tune train --config`` replays.

Only knobs that can change between epochs are searched this way (:func:`ssl_train.config.schedulable`); batch size,
architecture or method are refused (:func:`check_schedulable`): search those with TPE.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import PopulationBasedTraining

from search_spaces import SearchSpace
from search_spaces.loader import SearchSpaceError
from ssl_train.config import SCHEDULABLE_KEYS, TrainConfig, schedulable

POPULATION_SEARCHERS = ("pbt",)
RESAMPLE_PROBABILITY = 0.25  # PBT's default (Jaderberg et al. 2017); PBA resamples with 0.2
QUANTILE = 0.25  # the bottom quarter copies the top quarter
SCHEDULE = "schedule"  # a member's result: its lineage's schedule steps, as JSON
EXPLOIT = "exploit"  # a member's first result after copying another: {"from", "epoch", "set"}, as JSON


def check_schedulable(space: SearchSpace) -> None:
    """Refuse a space that PBT cannot search: a knob that cannot change mid-run, or a conditional one."""
    for param in space.params:
        if not schedulable(param.path):
            raise SearchSpaceError(
                f"{space.source}: {param.path}: cannot change mid-run, so --searcher pbt cannot search it (search it "
                "with --searcher tpe, or move it under 'fixed:'; pbt searches the augment.* ops, "
                f"{', '.join(sorted(SCHEDULABLE_KEYS))})")
        if param.when:
            raise SearchSpaceError(f"{space.source}: {param.path}: --searcher pbt explores every knob at once and "
                                   "has no conditions (drop 'when:', or use --searcher tpe)")


def mutations(space: SearchSpace) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: a Tune domain per number, the choices' list (in order) per choice."""
    domains: dict[str, Any] = {}
    for param in space.params:
        if param.kind == "uniform":
            domains[param.path] = tune.uniform(param.low, param.high)
        elif param.kind == "loguniform":
            domains[param.path] = tune.loguniform(param.low, param.high)
        elif param.kind == "int":
            domains[param.path] = tune.randint(param.low, param.high + 1)
        else:
            domains[param.path] = param.choice_values()
    return domains


def clip_to_space(space: SearchSpace) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """PBT's ``custom_explore_fn``: a number perturbed past its range is put back on the range's edge."""
    bounded = [param for param in space.params if param.kind != "choice"]

    def clip(config: dict[str, Any]) -> dict[str, Any]:
        for param in bounded:
            value = min(max(config[param.path], param.low), param.high)
            config[param.path] = int(round(value)) if param.kind == "int" else value
        return config

    return clip


def population_space(space: SearchSpace, start: dict[str, Any], members: int, base_seed: int) -> dict[str, Any]:
    """Tune's ``param_space``: every member at the start's values (the space's fixed ones and the base's), one seed
    each."""
    values = {**space.fixed, **{param.path: start[param.path] for param in space.params}}
    return {**values, "seed": tune.grid_search([base_seed + member for member in range(members)])}


class FinalEpochPBT(PopulationBasedTraining):
    """Ray's PBT, but no exploit on a member's last epoch: weights copied then would train no further, and a member
    ends on the checkpoint its own last result scored."""

    def __init__(self, epochs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epochs = epochs

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:  # noqa: D102
        if result.get(self._time_attr, 0) >= self.epochs:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def build_pbt(space: SearchSpace, metric: str, perturb_every: int, epochs: int, seed: int) -> FinalEpochPBT:
    """PBT on the val objective ``metric``, perturbing every ``perturb_every`` epochs (``training_iteration``) before
    the last of ``epochs``."""
    random.seed(seed)  # PBT explores with the random module: a seeded sweep explores the same way
    return FinalEpochPBT(
        epochs, time_attr="training_iteration", metric=metric, mode="max", perturbation_interval=perturb_every,
        hyperparam_mutations=mutations(space), quantile_fraction=QUANTILE, resample_probability=RESAMPLE_PROBABILITY,
        custom_explore_fn=clip_to_space(space),
    )


def continue_lineage(previous: TrainConfig, wanted: TrainConfig, epoch: int, keys: Iterable[str]) -> TrainConfig:
    """The config a member trains with after restoring, at ``epoch``, a checkpoint that ``previous`` trained (a
    lineage: start values and schedule): ``wanted``'s values of ``keys`` from ``epoch`` on, as a schedule step where
    they differ from what ``previous`` would train that epoch with; everything else is ``wanted``'s."""
    keys = list(keys)
    earlier = [step for step in previous.schedule if step.epoch < epoch]
    before = previous.replace({"schedule": [vars(step) for step in earlier]}).at_epoch(epoch).flat()
    now, start = wanted.flat(), previous.flat()
    changed = {key: now[key] for key in keys if now[key] != before[key]}
    steps = [vars(step) for step in earlier] + ([{"epoch": epoch, "set": changed}] if changed else [])
    return wanted.replace({**{key: start[key] for key in keys}, "schedule": steps})


def donor_of(checkpoint_path: str) -> str:
    """The Tune trial whose checkpoint this is: ``.../trial_<id>/checkpoint_000003`` -> ``<id>``."""
    return Path(checkpoint_path).parent.name.removeprefix("trial_")


def plot_schedule(config: TrainConfig, keys: list[str], path: Path, whose: str = "the winner's") -> Path:
    """Each scheduled knob against the epoch, one panel a knob (a list value, as crop scale, by its low end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(config.optim.epochs)
    values = [config.at_epoch(epoch).flat() for epoch in epochs]
    shown = [key for key in keys if len({json.dumps(v[key]) for v in values}) > 1] or keys
    fig, axes = plt.subplots(len(shown), 1, figsize=(6, 1.8 * len(shown)), sharex=True, squeeze=False)
    for axis, key in zip(axes[:, 0], shown, strict=True):
        series = [v[key][0] if isinstance(v[key], list) else v[key] for v in values]
        axis.step([epoch + 1 for epoch in epochs], series, where="post")
        axis.set_ylabel(key.rpartition(".")[2] + (" (low)" if isinstance(values[0][key], list) else ""), fontsize=8)
    axes[-1, 0].set_xlabel("epoch")
    axes[-1, 0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(f"{whose} schedule", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
