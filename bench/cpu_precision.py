"""bf16 autocast + channels_last on a CPU: a whole demo trial's wall time, and whether it learns as well.

A demo trial (the default config, 6 epochs, digits at 32 px, kNN on val every epoch) trains with the old CPU
defaults (float32, NCHW: ``optim.mixed_precision=false optim.channels_last=false``) and with the new ones (bf16
autocast where the CPU runs it natively, channels_last), seed by seed, interleaved in this one process.
Reports each side's wall seconds, the ratio, and val kNN accuracy after the last epoch.

    python -m bench.cpu_precision [--seeds 3] [--epochs 6]   # appends its section to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from bench.common import append_section, machine, markdown_table
from ssl_train.config import load_config
from ssl_train.data import load_splits
from ssl_train.training.loop import in_process_device, train_loop, uses_bf16

SIDES = {"float32, NCHW (old CPU default)": ["optim.mixed_precision=false", "optim.channels_last=false"],
         "bf16 autocast + channels_last (new default)": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    splits = load_splits(load_config().data)
    rows = []
    for seed in range(args.seeds):
        for side, overrides in SIDES.items():
            config = load_config(overrides=[f"seed={seed}", f"optim.epochs={args.epochs}", *overrides])
            started = time.perf_counter()
            result = train_loop(config, lambda metrics, checkpoint: None, splits=splits)
            rows.append({"side": side, "seed": seed, "wall s": time.perf_counter() - started,
                         "val_knn_acc": result.history[-1]["val_knn_acc"],
                         "bf16": uses_bf16(config, in_process_device(config))})
    table = pd.DataFrame(rows)
    summary = table.groupby("side", sort=False).agg(
        wall_s=("wall s", "mean"), val_knn_acc_mean=("val_knn_acc", "mean"), val_knn_acc_std=("val_knn_acc", "std"),
        bf16=("bf16", "first")).reset_index()
    ratio = summary["wall_s"].iloc[0] / summary["wall_s"].iloc[1]
    print(markdown_table(table), markdown_table(summary), f"speed-up {ratio:.2f}x", sep="\n\n")
    append_section(f"""## bf16 + channels_last on the CPU: a demo trial (bench/cpu_precision.py, {time.strftime("%F")})

`python -m bench.cpu_precision --seeds {args.seeds} --epochs {args.epochs}` ({machine()}): the default
config for {args.epochs} epochs, kNN on val each epoch, the two sides interleaved seed by seed. A trial's wall time,
evaluation included: **{ratio:.2f}x faster** with the new defaults.

{markdown_table(summary)}

Per run:

{markdown_table(table)}
""")


if __name__ == "__main__":
    main()
