"""Images/s of a whole training step: the per-sample augmentation path, the batched path and lightly 1.6's BYOL.

Every side runs in this one process, interleaved round by round, with the same thread count, batch, backbone and
images, and no DataLoader worker processes (augmentation runs in the training process on every side):

- ``per_sample``: ``augment.backend=per_sample``, torchvision v2 per image in a DataLoader (the old path);
- ``batched``: ``augment.backend=batched``, an index gather and :class:`BatchedViews` on the device (the default);
- ``batched+compile``: the same with ``optim.compile=true``, in the ``--compile-cases`` (compilation left out
  of the timing);
- ``lightly``: lightly 1.6's BYOL example (``BYOLTransform`` on PIL images, ``BYOLProjectionHead`` /
  ``BYOLPredictionHead``, ``NegativeCosineSimilarity``, ``update_momentum``, SGD) around the same backbone.

The first two drive :class:`ssl_train.training.loop.Trainer`'s own batches and ``train_step``.
A step's time is split into
producing its views (augmentation) and the model step (forward, backward, optimiser, EMA). Usage::

    python -m bench.throughput               # ~15 min on 2 cores; appends its section to bench/RESULTS.md
    python -m bench.throughput --print-only  # only print it
    python -m bench.throughput --device cuda --bf16 --channels-last   # the same on a GPU
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from bench.common import append_section, markdown_table
from ssl_train.config import TrainConfig, load_config
from ssl_train.data import load_splits
from ssl_train.training.loop import Trainer, WorkerContext, train_step

CASES = [  # (method, backbone, image side)
    ("byol", "small_cnn", 32), ("byol", "resnet18", 32), ("byol", "resnet18", 96),
    ("swav", "small_cnn", 32), ("swav", "resnet18", 32), ("swav", "resnet18", 96),
]
SWAV_MULTI_CROP = ["augment.num_local_crops=4"]  # 2 global + 4 local crops
VARIANTS = {  # a side of ours: its overrides (a name with "bf16" also turns bf16 autocast on, CPU included)
    "per_sample": ["augment.backend=per_sample"],
    "batched": [],
    "batched+channels_last": ["optim.channels_last=true"],
    "batched+bf16": [],
    "batched+channels_last+bf16": ["optim.channels_last=true"],
    "batched+compile": ["optim.compile=true"],
    "batched+compile+channels_last": ["optim.compile=true", "optim.channels_last=true"],
    "batched+compile+bf16": ["optim.compile=true"],
}


@dataclass
class Side:
    """One way of training: ``next_views()`` makes a batch's views, ``step(views)`` trains on them."""

    name: str
    next_views: Callable[[], list[torch.Tensor]]
    step: Callable[[list[torch.Tensor]], None]
    augment_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)

    def run(self, steps: int, synchronize: Callable[[], None]) -> None:
        for _ in range(steps):
            started = time.perf_counter()
            views = self.next_views()
            synchronize()
            produced = time.perf_counter()
            self.step(views)
            synchronize()
            self.augment_s.append(produced - started)
            self.step_s.append(time.perf_counter() - produced)


def endless(make_epoch: Callable[[int], Iterator[list[torch.Tensor]]]) -> Callable[[], list[torch.Tensor]]:
    """``next_views`` over epoch after epoch of ``make_epoch(epoch)``."""
    state = {"epoch": 0, "it": iter(make_epoch(0))}

    def next_views() -> list[torch.Tensor]:
        try:
            return next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            state["it"] = iter(make_epoch(state["epoch"]))
            return next(state["it"])

    return next_views


def ssl_tune_side(name: str, config: TrainConfig, splits, device: torch.device,  # noqa: ANN001
                  bf16: bool | None = None) -> Side:
    """Our training step; ``bf16`` forces bf16 autocast on or off (the Trainer turns it on for CUDA only)."""
    trainer = Trainer(config, lambda m, c: None, WorkerContext(device=device), splits=splits)
    trainer.bf16 = trainer.bf16 if bf16 is None else bf16
    trainer.method.train()
    counter = {"step": 0}

    def step(views: list[torch.Tensor]) -> None:
        views = [v.to(device, non_blocking=True, memory_format=trainer.memory_format) for v in views]
        train_step(trainer.model, trainer.method, trainer.state.optimizer, trainer.state.scheduler, views,
                   counter["step"] % trainer.total_steps, 0, trainer.total_steps, bf16=trainer.bf16)
        counter["step"] += 1

    return Side(name, endless(lambda epoch: iter(trainer.batches.for_epoch(epoch))), step)


def lightly_side(config: TrainConfig, splits, device: torch.device) -> Side:  # noqa: ANN001
    """lightly 1.6's BYOL example (examples/pytorch/byol.py) around our backbone, on PIL images."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms.v2 import functional as TF

    from ssl_train.methods.backbones import build_backbone

    class LightlyBYOL(nn.Module):
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            b = config.byol
            self.backbone = backbone
            self.projection_head = BYOLProjectionHead(backbone.feature_dim, b.projector_hidden_dim, b.projector_out_dim)
            self.prediction_head = BYOLPredictionHead(b.projector_out_dim, b.predictor_hidden_dim, b.projector_out_dim)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

        def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    side = config.data.image_size
    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=side),
                              view_2_transform=BYOLView2Transform(input_size=side))
    pil_images = [TF.to_pil_image(image) for image in splits.ssl_train.images]

    class Images(Dataset):
        def __len__(self) -> int:
            return len(pil_images)

        def __getitem__(self, index: int) -> list[torch.Tensor]:
            return transform(pil_images[index])

    loader = DataLoader(Images(), batch_size=config.optim.batch_size, shuffle=True, drop_last=True)
    model = LightlyBYOL(build_backbone(config.backbone)).to(device)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)

    def step(views: list[torch.Tensor]) -> None:
        x0, x1 = (v.to(device, non_blocking=True) for v in views)
        update_momentum(model.backbone, model.backbone_momentum, m=0.99)
        update_momentum(model.projection_head, model.projection_head_momentum, m=0.99)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            p0, z0, p1, z1 = model(x0), model.forward_momentum(x0), model(x1), model.forward_momentum(x1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model.train()
    return Side("lightly", endless(lambda epoch: iter(loader)), step)


def case_config(method: str, backbone: str, side: int, args: argparse.Namespace, *extra: str) -> TrainConfig:
    overrides = [f"method={method}", f"backbone.name={backbone}", f"data.image_size={side}",
                 f"optim.batch_size={args.batch}", "optim.epochs=100", "optim.warmup_epochs=1",
                 f"scaling.use_gpu={args.device == 'cuda'}", f"optim.mixed_precision={args.bf16}",
                 f"optim.channels_last={args.channels_last}", *extra]
    if method == "swav":
        overrides += SWAV_MULTI_CROP
    return load_config(overrides=overrides)


def measure_case(method: str, backbone: str, side: int, args: argparse.Namespace) -> list[dict[str, object]]:
    device = torch.device(args.device)
    config = case_config(method, backbone, side, args)
    splits = load_splits(config.data)
    compiled = f"{method}/{backbone}/{side}" in args.compile_cases.split(",")
    sides = [ssl_tune_side(variant, case_config(method, backbone, side, args, *VARIANTS[variant]), splits, device,
                           bf16=True if "bf16" in variant else None)
             for variant in args.variants.split(",") if variant in VARIANTS and (compiled or "compile" not in variant)]
    if method == "byol" and "lightly" in args.variants.split(","):
        sides.append(lightly_side(config, splits, device))
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warmup_s = {}
    for s in sides:  # warm-up (and compilation), timed apart
        started = time.perf_counter()
        s.run(args.warmup, synchronize)
        warmup_s[s.name] = time.perf_counter() - started
        s.augment_s.clear()
        s.step_s.clear()
    for _ in range(args.rounds):
        for s in sides:
            s.run(args.steps, synchronize)
    rows = []
    for s in sides:
        augment, model = statistics.median(s.augment_s), statistics.median(s.step_s)
        rows.append({"method": method + (" 2+4 crops" if method == "swav" else ""), "backbone": backbone,
                     "px": side, "path": s.name, "images/s": args.batch / (augment + model),
                     "augment ms/step": 1000 * augment, "model ms/step": 1000 * model,
                     "augment % of step": 100 * augment / (augment + model), "warm-up s": warmup_s[s.name]})
    base = rows[0]["images/s"]
    for row in rows:
        row[f"x {rows[0]['path']}"] = row["images/s"] / base
    lightly = [r for r in rows if r["path"] == "lightly"]
    for row in rows:
        row["x lightly"] = row["images/s"] / lightly[0]["images/s"] if lightly else "n/a"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA; on a CPU use the +bf16 variants)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile-cases", default="byol/small_cnn/32,swav/small_cnn/32",
                        help="cases that also time batched + optim.compile (compiling takes minutes on a CPU)")
    parser.add_argument("--variants", default="per_sample,batched,batched+compile,lightly",
                        help=f"sides to time, the first the baseline of `x per_sample`: {', '.join(VARIANTS)}, lightly")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side (compilation happens here)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every side in turn")
    parser.add_argument("--cases", default=",".join(f"{m}/{b}/{s}" for m, b, s in CASES),
                        help="comma-separated method/backbone/side")
    parser.add_argument("--print-only", action="store_true", help="print the section, do not append it to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    rows = []
    for case in args.cases.split(","):
        method, backbone, side = case.split("/")
        rows += measure_case(method, backbone, int(side), args)
        print(markdown_table(pd.DataFrame(rows), digits=2), flush=True)
    cpu = f"{os.cpu_count()}-core {platform.machine()} CPU"
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu
    section = "\n".join([
        f"## Training-step throughput: per-sample vs batched augmentation vs lightly (bench/throughput.py, "
        f"{time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Device: {device}; {args.threads} torch threads; torch {torch.__version__}; batch {args.batch}; bf16 "
        f"{args.bf16}, channels_last {args.channels_last}; load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; {time.perf_counter() - started:.0f} s. Medians of {args.rounds} "
        f"interleaved rounds x {args.steps} steps per side, after {args.warmup} warm-up steps (their seconds, "
        "compilation included, in `warm-up s`). No DataLoader worker "
        "processes on any side. `x <first side>` and `x lightly` are images/s ratios within a case.",
        "",
        markdown_table(pd.DataFrame(rows), digits=2),
    ])
    print(section)
    if not args.print_only:
        append_section(section)


if __name__ == "__main__":
    main()
