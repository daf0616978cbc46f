"""Does training with the defaults learn? Test kNN of the backbone at random init vs after a wall-clock budget.

For each method (BYOL, SwAV) with the default config (plus any ``--set`` overrides): the kNN accuracy
(``eval.knn_k``, ``eval.knn_temperature``) of the backbone at random init, i.e. the very weights training
starts from (``build_model`` seeds them); then ``train_loop`` with per-epoch kNN, stopped at the first epoch
end past the budget or at ``optim.epochs``. The target (issue "It learns"): a gain of at least
``TARGET_GAIN`` accuracy points within 3 minutes on a 2-core CPU, with the embedding std (x sqrt(d); 1 is
spread, 0 collapsed) above ``STD_FLOOR`` at every epoch. Usage::

    python -m bench.learns                 # ~7 min on 2 idle cores; appends its section to bench/RESULTS.md
    python -m bench.learns --print-only    # only print it
    python -m bench.learns --methods swav --budget-s 60 --set optim.epochs=8
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd

from bench.common import append_section, machine, markdown_table
from ssl_train.config import TrainConfig, load_config
from ssl_train.data import load_splits
from ssl_train.evaluation.evaluate import evaluate_backbone
from ssl_train.training.loop import WorkerContext, build_model, train_loop

TARGET_GAIN = 0.05  # kNN accuracy points over the same backbone at random init
STD_FLOOR = 0.5  # embedding std x sqrt(d): about 1 when spread, 0 when collapsed
BUDGET_S = 180.0


class BudgetReached(Exception):
    """Raised by the report callback at the first epoch end past the budget: it ends ``train_loop`` there."""


@dataclass
class LearnResult:
    """One method's measurement: the random-init kNN and the per-epoch metrics of the budgeted run."""

    method: str
    random_knn: float
    history: list[dict[str, Any]]
    budget_s: float
    stopped_by_budget: bool

    @property
    def within_budget(self) -> list[dict[str, Any]]:
        """The epochs that ended inside the budget: the ones the target is judged on."""
        return [m for m in self.history if m["elapsed_s"] <= self.budget_s]

    @property
    def final_knn(self) -> float:
        """kNN after the last epoch that ended inside the budget (random-init kNN if none did)."""
        return self.within_budget[-1]["val_knn_acc"] if self.within_budget else self.random_knn

    @property
    def gain(self) -> float:
        return self.final_knn - self.random_knn

    @property
    def min_std(self) -> float:
        return min(m["embedding_std"] for m in self.history)

    def passed(self, target_gain: float = TARGET_GAIN, std_floor: float = STD_FLOOR) -> bool:
        return self.gain >= target_gain and self.min_std > std_floor


def measure(config: TrainConfig, budget_s: float = BUDGET_S) -> LearnResult:
    """Random-init kNN of ``config``'s backbone, then train it for ``budget_s`` seconds (whole epochs)."""
    if config.eval.every_epochs != 1:
        config = config.replace({"eval.every_epochs": 1})
    splits = load_splits(config.data)
    random_knn = evaluate_backbone(build_model(config).backbone, splits, config.eval)["val_knn_acc"]
    history: list[dict[str, Any]] = []
    started = time.perf_counter()

    def record(metrics: dict[str, Any], _checkpoint: Any) -> None:
        history.append({**metrics, "elapsed_s": time.perf_counter() - started})
        if history[-1]["elapsed_s"] > budget_s and metrics["epoch"] < config.optim.epochs:
            raise BudgetReached

    try:
        train_loop(config, record, WorkerContext(), splits=splits)
        stopped = False
    except BudgetReached:
        stopped = True
    return LearnResult(config.method, random_knn, history, budget_s, stopped)


def epoch_table(result: LearnResult) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "epoch": m["epoch"],
            "elapsed (s)": round(m["elapsed_s"], 1),
            "loss": m["loss"],
            "kNN acc": m["val_knn_acc"],
            "embedding std": m["embedding_std"],
            "images/s": round(m["images_per_s"]),
        }
        for m in result.history
    )


def summary_table(results: list[LearnResult]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "method": r.method,
            "random-init kNN": r.random_knn,
            "trained kNN": r.final_knn,
            "gain (points)": round(100 * r.gain, 1),
            "epochs in budget / run": f"{len(r.within_budget)} / {len(r.history)}",
            "at (s)": round(r.within_budget[-1]["elapsed_s"], 1) if r.within_budget else "-",
            "min embedding std": r.min_std,
            f"pass (>= +{100 * TARGET_GAIN:.0f} pts, std > {STD_FLOOR}, <= {r.budget_s:.0f} s)": (
                "PASS" if r.passed() else "FAIL"
            ),
        }
        for r in results
    )


def section(results: list[LearnResult], config: TrainConfig, overrides: list[str], load: tuple[float, float]) -> str:
    c = config
    recipe = (
        f"{c.data.source} {c.data.image_size}px, {c.backbone.name} width {c.backbone.width}, {c.optim.optimizer} "
        f"lr {c.optim.lr:g}, batch {c.optim.batch_size}, {c.optim.epochs} epochs (warm-up {c.optim.warmup_epochs}), "
        f"crop scale {c.augment.crop_scale} (SwAV global {c.augment.global_crop_scale}), flip p {c.augment.flip_p}, "
        f"augment strength {c.augment.strength:g}; BYOL tau_base {c.byol.tau_base:g}; SwAV {c.swav.num_prototypes} "
        f"prototypes, {c.swav.projector_out_dim}-d, eps {c.swav.epsilon:g}, temperature {c.swav.temperature:g}; "
        f"kNN k={c.eval.knn_k}, T={c.eval.knn_temperature:g}"
    )
    lines = [
        "## It learns: kNN gain over random init with the defaults (bench/learns.py)",
        "",
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()}-core CPU (this dev machine), {machine()}; "
        f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (the machine is shared).",
        "",
        f"Config: the defaults{' with ' + ' '.join(overrides) if overrides else ''}: {recipe}. "
        f"Budget {results[0].budget_s:.0f} s of training (stopped at the first epoch end past it or at the "
        "configured epochs); kNN on the test split, eval.every_epochs = 1 (its time counts in the budget).",
        "",
        markdown_table(summary_table(results)),
    ]
    for result in results:
        lines += ["", f"{result.method} per epoch:", "", markdown_table(epoch_table(result))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["byol", "swav"], choices=["byol", "swav"])
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="training wall-clock budget per method")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--print-only", action="store_true", help="print the section, do not append it")
    args = parser.parse_args(argv)

    load_start = os.getloadavg()[0]
    results = []
    for method in args.methods:
        result = measure(load_config(overrides=[f"method={method}", *args.overrides]), args.budget_s)
        print(markdown_table(epoch_table(result)), flush=True)
        results.append(result)
    text = section(results, load_config(overrides=args.overrides), args.overrides, (load_start, os.getloadavg()[0]))
    print(text)
    if not args.print_only:
        append_section(text)


if __name__ == "__main__":
    main()
