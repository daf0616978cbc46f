"""What a sweep ranks its trials by: ``--objective auto`` resolved for the data, and the warning when the chosen
objective is known to fail on data like this.

``auto`` is kNN accuracy where there are labels and RankMe where there are none: the choices that
``bench/objective_rank.py`` supports (bench/RESULTS.md, "Objective rank"). Over 32 recipes on each of three data
sets, val kNN accuracy ranked them as images no split used do at Spearman 0.74-0.93; the vote's share for the true
class (``knn_prob``) has a standard error 1.4-2.6x smaller but ranked no better at the full val split (0.65-0.91);
RankMe led the label-free scores (0.32-0.85; alpha-ReQ 0.32-0.82; the rotation probe -0.38 to 0.25).
"""

from __future__ import annotations

from typing import Any

from search_spaces import SearchSpace, SearchSpaceError
from ssl_train.config import ConfigError, TrainConfig

# Objectives that need no labels: RankMe (Garrido et al. 2023, eq. 1), alpha-ReQ (Agrawal et al. 2022) and
# SelfAugment's rotation probe (Reed et al. 2021); see ssl_train/evaluation/.
LABEL_FREE_OBJECTIVES = ("rankme", "alpha_req", "rotation")
LABELED_OBJECTIVES = ("knn_prob", "knn_acc", "linear_acc")
AUTO = "auto"
OBJECTIVES = (AUTO, *LABELED_OBJECTIVES, *LABEL_FREE_OBJECTIVES)
AUTO_LABELED = "knn_acc"
AUTO_LABEL_FREE = "rankme"


def resolve_objective(objective: str, labeled: bool) -> str:
    """``auto`` -> the objective for data with or without labels; any other name is kept."""
    if objective != AUTO:
        return objective
    return AUTO_LABELED if labeled else AUTO_LABEL_FREE


def check_objective(objective: str, space: SearchSpace) -> None:
    """A label-free objective compares runs of one method only: a space that searches ``method`` is refused.

    RankMe's scale depends on the method (its loss and head shape the feature spectrum); Garrido et al. 2023 validate
    it only between runs of one method, so a sweep over two would rank the methods, not the recipes.
    """
    methods = {value for param in space.params if param.path == "method" for value in param.choices or ()}
    if objective in LABEL_FREE_OBJECTIVES and len(methods) > 1:
        raise SearchSpaceError(
            f"{space.source}: method: searched over {sorted(methods)}, but --objective {objective} compares runs of "
            f"one method only ({objective} values of different methods are not comparable); fix method in the space "
            "(fixed: {method: byol}) and run one sweep per method, or use --objective knn_acc with labels")


def check_labels(objective: str, splits: Any) -> None:
    """Data with no labels can only be searched with a label-free objective."""
    if not splits.labeled and objective not in LABEL_FREE_OBJECTIVES:
        raise ConfigError(
            f"--objective {objective} needs labels, but {splits.name} has none (no class sub-folders, no 'label' "
            f"column, no data.labeled_path); use --objective {LABEL_FREE_OBJECTIVES[0]} (needs no labels) or set "
            "data.labeled_path")


def orientation_warning(objective: str, base: TrainConfig, splits: Any) -> str | None:
    """For ``rotation``: a line when random-init features cannot tell the val images' rotations apart, a sign that
    the images look alike at every rotation (textures, satellite tiles, microscopy) and the rotation probe cannot
    rank recipes there (bench/objective_rank.py measured it: chance on generated textures, far above on digits)."""
    if objective != "rotation":
        return None
    from ssl_train.evaluation.features import extract_features
    from ssl_train.evaluation.rotation import orientation_informative, rotation_probe_accuracy
    from ssl_train.training.loop import build_model

    backbone = build_model(base).backbone
    accuracy = rotation_probe_accuracy(lambda x: extract_features(backbone, x), splits.val.images)
    if orientation_informative(accuracy, len(splits.val)):
        return None
    return (f"warning: --objective rotation: random-init features tell the val images' rotations apart at "
            f"{accuracy:.2f} (chance 0.25), so these images look alike at every rotation and the rotation probe "
            f"cannot rank recipes; use --objective {AUTO_LABEL_FREE}")
