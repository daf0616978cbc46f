"""What each demo scale costs and what it leaves to learn: the start (BYOL paper views) trained for the demo's epochs
against the same backbone at random init, on MNIST-5k's val split, per image size and CNN width (issue 35, point 2).

One process, one torch thread (as a trial of the demo, two at once on 2 cores), no Ray: per scale, the random-init
backbone's val kNN over 3 seeds (its features as the sweep's baseline computes them), the start's val kNN after
training, the gap, and the seconds a training run takes. A scale is chosen here, on val; the demo's test figures
(``bench/demo_outcome.py``, which times it end to end) are then read on a split that chose nothing.

    python -m bench.demo_scale [--scales 24x16 28x12 ...] [--seeds 0 1 2] [--write]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from bench.common import machine, markdown_table, replace_section
from ssl_train.config import load_config
from ssl_train.data import load_splits
from ssl_train.evaluation.evaluate import evaluate_backbone
from ssl_train.training.loop import build_model, train_loop, uses_bf16
from tuning.cli_args import DEMO_DATA, DEMO_RECIPE, DEMO_SWEEP_EPOCHS

SCALES = ("16x16", "24x8", "24x16", "26x12", "28x8", "28x10", "28x12", "28x16")


def measure(size: int, width: int, seeds: list[int]) -> dict[str, object]:
    """Random init and the trained start at one scale: val kNN means over ``seeds`` and seconds a run."""
    overrides = [f"data.source={DEMO_DATA}", f"data.image_size={size}", f"backbone.width={width}", *DEMO_RECIPE,
                 f"optim.epochs={DEMO_SWEEP_EPOCHS}", "eval.test_at_end=false"]
    base = load_config(overrides=overrides)
    splits = load_splits(base.data)
    bf16 = uses_bf16(base, torch.device("cpu"))
    random_init = [evaluate_backbone(build_model(base.replace({"seed": seed})).backbone, splits, base.eval,
                                     split="val", bf16=bf16)["val_knn_acc"] for seed in seeds]
    start, seconds = [], []
    for seed in seeds:
        began = time.perf_counter()
        outcome = train_loop(base.replace({"seed": seed}), lambda _metrics, _checkpoint: None, splits=splits)
        seconds.append(time.perf_counter() - began)
        start.append(outcome.history[-1]["val_knn_acc"])
    return {"image px": size, "width": width, "random init": np.mean(random_init), "start": np.mean(start),
            "start - random init": np.mean(start) - np.mean(random_init), "start min": np.min(start),
            "s a run": np.mean(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", default=list(SCALES), help="SIZExWIDTH, e.g. 28x12")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--write", action="store_true", help="replace the section in bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for scale in args.scales:
        size, _, width = scale.partition("x")
        rows.append(measure(int(size), int(width), args.seeds))
        print(rows[-1], flush=True)
    text = (f"## Demo scale\n\n{time.strftime('%Y-%m-%d')}, {machine()}. "
            f"`python -m bench.demo_scale --seeds {' '.join(map(str, args.seeds))}`: the demo's start (BYOL paper "
            f"views) trained {DEMO_SWEEP_EPOCHS} epochs on {DEMO_DATA} against the same backbone at random init, val "
            f"kNN (the split a choice is made on), {len(args.seeds)} seeds a scale.\n\n"
            + markdown_table(pd.DataFrame(rows)) + "\n")
    print(text)
    if args.write:
        replace_section("Demo scale", text)


if __name__ == "__main__":
    main()
