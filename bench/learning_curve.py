"""Learning curve of the default config: val kNN accuracy against optimiser steps, several seeds, with the
random-init and raw-pixel lines. It answers one question: after how many steps does the default beat the
random-init backbone by 5 points?

    python -m bench.learning_curve [--seeds 3] [--epochs 30] [--set KEY=VALUE ...] [--write]

Writes ``bench/learning_curve.png`` and ``bench/learning_curve.csv``; ``--write`` appends the table to
``bench/RESULTS.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bench.common import append_section, machine, markdown_table  # noqa: E402
from bench.objective_noise import command_line, default_runs_setup, train_with_features  # noqa: E402
from ssl_train.evaluation.knn import fitted_knn_k, knn_accuracy, knn_protocol, pixel_knn_accuracy  # noqa: E402

HERE = Path(__file__).parent
MARGIN = 0.05


def first_step_ahead(curve: pd.DataFrame, random_init: float, margin: float = MARGIN) -> int | None:
    """The first step from which the mean val stays at least ``margin`` above random init (None: never)."""
    ahead = curve["val_mean"] >= random_init + margin
    for row in range(len(curve)):
        if ahead.iloc[row:].all():
            return int(curve["steps"].iloc[row])
    return None


def main() -> None:
    args, base, splits = default_runs_setup(__doc__, seeds=3, epochs=30)
    k = fitted_knn_k(base.eval.knn_k, splits.eval_train.labels)
    started = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        for f in train_with_features(base.replace({"seed": seed}), splits):
            val = knn_accuracy(f.eval_train, splits.eval_train.labels, f.val, splits.val.labels, splits.num_classes,
                               k, base.eval.knn_temperature)
            rows.append({"seed": seed, "epoch": f.epoch, "steps": f.steps, "val": val})
    seconds = time.perf_counter() - started
    per_seed = pd.DataFrame(rows)
    per_seed.to_csv(HERE / "learning_curve.csv", index=False)
    curve = per_seed.groupby(["epoch", "steps"])["val"].agg(val_mean="mean", val_min="min", val_max="max")
    curve = curve.reset_index()
    random_init = float(curve["val_mean"].iloc[0])
    pixels = pixel_knn_accuracy(splits, base.eval, split="val")
    ahead = first_step_ahead(curve, random_init)

    fig, ax = plt.subplots(figsize=(7, 4))
    for seed, part in per_seed.groupby("seed"):
        ax.plot(part["steps"], part["val"], alpha=0.35, lw=1, label=f"seed {seed}")
    ax.plot(curve["steps"], curve["val_mean"], c="black", lw=2, label="mean over seeds")
    ax.axhline(random_init, ls="--", c="tab:gray", label=f"random init {random_init:.3f}")
    ax.axhline(random_init + MARGIN, ls=":", c="tab:gray", label="random init + 5 points")
    ax.axhline(pixels, ls="--", c="tab:red", label=f"raw pixels {pixels:.3f}")
    protocol = knn_protocol(base.eval, splits.eval_train.labels)
    ax.set(xlabel="optimiser steps", ylabel="val kNN accuracy",
           title=f"default {base.method} on {base.data.source} {base.data.image_size}px, {protocol}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "learning_curve.png", dpi=100)

    answer = (f"the mean val stays >= random init + 5 points from step {ahead} on" if ahead is not None
              else f"the mean val never stays >= random init + 5 points within {int(curve['steps'].iloc[-1])} steps")
    text = (
        f"## Learning curve ({time.strftime('%Y-%m-%d')}, {machine()})\n\n"
        + command_line("learning_curve", args) + f" ({seconds:.0f} s): the default config "
        f"({base.method}, batch {base.optim.batch_size}, lr {base.optim.lr:g}, warm-up {base.optim.warmup_epochs} "
        f"epochs), val by {protocol}; random init {random_init:.3f}, raw pixels {pixels:.3f}. "
        f"**Answer: {answer}.** Plot: `bench/learning_curve.png`.\n\n" + markdown_table(curve) + "\n"
    )
    print(text)
    if args.write:
        append_section(text)


if __name__ == "__main__":
    main()
