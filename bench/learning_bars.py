"""Where tests/test_learns.py sets its bars: each learning margin over 5 seeds, in float32 and in bf16 (issue 35.2).

The learning test trains the default config (digits, 20 epochs) of BYOL and SwAV and asserts two margins: the last
epoch's val kNN over the random-init backbone's, and over the first epoch's. One run sits at the mercy of its seed
and of the CPU's arithmetic (a run in emulated bf16 missed its bar by one val image), so here every margin is
measured for seeds 0-4 with ``optim.mixed_precision`` off (float32, what a CPU without native bf16 runs) and on (bf16
autocast, where this CPU runs it natively), and the test's bars sit below the whole spread.

    python -m bench.learning_bars [--seeds 0 1 2 3 4] [--write]
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from bench.common import machine, markdown_table, replace_section
from ssl_train.config import load_config
from ssl_train.data import load_splits
from ssl_train.evaluation.evaluate import evaluate_backbone
from ssl_train.training.loop import build_model, cpu_has_native_bf16, train_loop


def margins(method: str, seed: int, bf16: bool, digits) -> dict[str, float]:
    config = load_config(overrides=[f"method={method}", f"seed={seed}", f"optim.mixed_precision={bf16}"])
    random_init = evaluate_backbone(build_model(config).backbone, digits, config.eval)["val_knn_acc"]
    result = train_loop(config, lambda metrics, checkpoint: None, splits=digits)
    knn = [epoch["val_knn_acc"] for epoch in result.history]
    return {"method": method, "precision": "bf16" if bf16 else "float32", "seed": seed, "random init": random_init,
            "first epoch": knn[0], "last epoch": knn[-1], "last - random init": knn[-1] - random_init,
            "last - first": knn[-1] - knn[0],
            "min embedding std": min(epoch["embedding_std"] for epoch in result.history)}


def report(table: pd.DataFrame, seconds: float) -> str:
    spread = table.groupby("method")[["last - random init", "last - first", "min embedding std"]].agg(["min",
                                                                                                     "median"])
    spread.columns = [f"{metric}, {stat}" for metric, stat in spread.columns]
    return (f"## Learning bars\n\n{time.strftime('%Y-%m-%d')}, {machine()}. `python -m bench.learning_bars`: the "
            "default config on digits (20 epochs) for each method, seed and precision, as tests/test_learns.py "
            f"trains it; {seconds / 60:.0f} min in all.\n\n" + markdown_table(table) + "\n\nSpread per method (the "
            "test's bars lie below each minimum):\n\n" + markdown_table(spread.reset_index()) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=["byol", "swav"])
    parser.add_argument("--write", action="store_true", help="replace the section in bench/RESULTS.md")
    args = parser.parse_args()
    if not cpu_has_native_bf16():
        print("note: this CPU has no native bf16; the bf16 rows run emulated (slower, the same arithmetic)")
    started = time.perf_counter()
    digits = load_splits(load_config().data)
    rows = []
    for method in args.methods:
        for bf16 in (False, True):
            for seed in args.seeds:
                rows.append(margins(method, seed, bf16, digits))
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    text = report(pd.DataFrame(rows), time.perf_counter() - started)
    print(text)
    if args.write:
        replace_section("Learning bars", text)


if __name__ == "__main__":
    main()
