"""Do a sweep's trials share the decoded images? Trial memory and start-up at 10k, 40k and 100k images (issue 36.4).

For each size: a class-folder tree of N generated 32 px PNGs (10 classes), decoded by ``load_splits`` as a sweep
does before Ray starts (timed), put in Ray's object store (timed), then ``--trials`` concurrent Tune trials that get
the splits through ``tune.with_parameters``, as a sweep's trials do, gather batches from every SSL-train image as
the batched trainer does (an index gather a batch), and report their own memory from ``/proc/self/smaps_rollup``:
RSS (which counts the shared object-store pages a trial has read), and USS, the trial's private memory (what each
further trial adds). Baseline, in the same run: the same trials given the images as a torch tensor, how they
travelled before (Ray pickles a tensor into each trial's own memory).

    python -m bench.shared_data [--sizes 10000 40000 100000] [--write]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from PIL import Image
from ray import tune

from bench.common import machine, markdown_table, replace_section
from ssl_train.config import DataConfig
from ssl_train.data import load_splits

SIZE = 32
CLASSES = 10
BATCH = 256


def write_folder(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` PNGs of smooth random colour fields in ``CLASSES`` class folders."""
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    coarse = rng.integers(0, 256, size=(count, 4, 4, 3), dtype=np.uint8)
    for i in range(count):
        image = Image.fromarray(coarse[i]).resize((SIZE, SIZE), Image.BILINEAR)
        image.save(root / f"class_{i % CLASSES}" / f"{i:06d}.png")
    return root


def memory_mb() -> dict[str, float]:
    """This process's RSS, PSS and USS (private clean + dirty) in MB, from /proc/self/smaps_rollup."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def probe(params: dict[str, Any], data: Any) -> None:
    """A trial's data path: every SSL-train image gathered once, a batch at a time, then its memory."""
    images = data["images"] if isinstance(data, dict) else data.ssl_train.images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(params["seed"]))
    checksum = 0
    for batch in order.split(BATCH):
        checksum += int(images[batch].float().mean() > 0)
    tune.report({**memory_mb(), "checksum": checksum})


def trial_memory(data: Any, trials: int, storage: str, name: str) -> dict[str, float]:
    """Mean memory of ``trials`` concurrent probe trials that get ``data`` through ``tune.with_parameters``."""
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(probe, data=data), {"cpu": 1}),
        param_space={"seed": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=trials),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
    )
    results = tuner.fit().get_dataframe()
    return {key: float(results[key].mean()) for key in ("rss", "pss", "uss")}


def measure(count: int, trials: int, root: Path) -> dict[str, float]:
    folder = write_folder(root / f"n{count}", count)
    started = time.perf_counter()
    splits = load_splits(DataConfig(source="folder", path=str(folder), image_size=SIZE, leak_check=False))
    decode_s = time.perf_counter() - started
    started = time.perf_counter()
    stored = ray.put(splits)
    put_s = time.perf_counter() - started
    del stored
    decoded_mb = splits.ssl_train.images.numel() / 2**20
    shared = trial_memory(splits, trials, str(root / "tune"), f"shared{count}")
    copied = trial_memory({"images": splits.ssl_train.images.clone()}, trials, str(root / "tune"), f"copied{count}")
    print(f"{count} images: decode {decode_s:.1f} s, put {put_s:.2f} s, shared {shared}, copied {copied}", flush=True)
    return {"images": count, "SSL-train pixels (MB)": decoded_mb, "decode s": decode_s,
            "decode images/s": count / decode_s, "object-store put s": put_s,
            **{f"trial {kind.upper()}, {how} (MB)": memory[kind] for how, memory in (("shared", shared),
                                                                                     ("copied", copied))
               for kind in ("uss", "pss", "rss")}}


def report(table: pd.DataFrame, trials: int, seconds: float) -> str:
    uss, pss = table["trial USS, shared (MB)"], table["trial PSS, shared (MB)"]
    spread = 100 * (uss.max() - uss.min()) / uss.min()
    pss_spread = 100 * (pss.max() - pss.min()) / pss.min()
    rate = table["decode images/s"]
    return (f"## Shared data\n\n{time.strftime('%Y-%m-%d')}, {machine()}. `python -m bench.shared_data`: "
            f"{trials} concurrent probe trials a size, {seconds / 60:.0f} min in all. Each trial gets the splits as a "
            "sweep's trials do and gathers every SSL-train image once, a batch at a time; USS is the trial's private "
            "memory; PSS adds its share of the pages it shares with other processes; RSS counts every object-store "
            "page it read in full (pages every trial on the node maps, held once). "
            "\"copied\" is the baseline: the images as a torch tensor, as they travelled before.\n\n"
            + markdown_table(table) + "\n\n"
            f"Trial private memory (USS) with shared images: {uss.min():.0f}-{uss.max():.0f} MB over a "
            f"{table['images'].max() / table['images'].min():.0f}x range of images ({spread:.0f} % apart; PSS "
            f"{pss_spread:.0f} % apart); copied, it grows with the pixels. Decoding ran at "
            f"{rate.min():.0f}-{rate.max():.0f} images/s, linear in the "
            "count.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 100_000])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="replace the section in bench/RESULTS.md")
    args = parser.parse_args()
    started = time.perf_counter()
    ray.init(num_cpus=args.trials, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="shared-data-") as root:
        table = pd.DataFrame([measure(count, args.trials, Path(root)) for count in args.sizes])
    text = report(table, args.trials, time.perf_counter() - started)
    print(text)
    if args.write:
        replace_section("Shared data", text)


if __name__ == "__main__":
    main()
