"""Optimisers and schedule: LARS by hand, parameter groups, lr scaling, warm-up + cosine, state round trip."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from torch import nn

from ssl_train.config import OptimConfig
from ssl_train.training.optim import LARS, base_lr, build_optimizer, build_scheduler


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)
    return model


def test_lars_step_by_hand() -> None:
    weight = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    bias = nn.Parameter(torch.tensor([1.0]))
    skipped = nn.Parameter(torch.tensor([2.0]))  # no gradient: left alone
    optimizer = LARS(
        [
            {"params": [weight, skipped], "weight_decay": 0.5},
            {"params": [bias], "weight_decay": 0.5, "lars_exclude": True},
        ],
        lr=0.1,
        momentum=0.9,
    )
    w, buffer_w, buffer_b, b = [3.0, 4.0], [0.0, 0.0], 0.0, 1.0
    for _ in range(2):
        weight.grad, bias.grad = torch.tensor([1.0, 0.0]), torch.tensor([0.5])
        optimizer.step()
        update = [1.0 + 0.5 * w[0], 0.0 + 0.5 * w[1]]  # g + wd * w
        trust = 1e-3 * math.hypot(*w) / math.hypot(*update)  # eta ||w|| / ||g + wd w||
        buffer_w = [0.9 * m + trust * u for m, u in zip(buffer_w, update, strict=True)]
        w = [x - 0.1 * m for x, m in zip(w, buffer_w, strict=True)]
        buffer_b = 0.9 * buffer_b + 0.5  # excluded: no weight decay, no trust ratio
        b = b - 0.1 * buffer_b
    torch.testing.assert_close(weight.detach(), torch.tensor(w))
    torch.testing.assert_close(bias.detach(), torch.tensor([b]))
    assert skipped.item() == 2.0
    assert optimizer.param_groups[0]["eta"] == 1e-3


def test_lars_trust_ratio_is_one_for_zero_weights() -> None:
    weight = nn.Parameter(torch.zeros(3))
    weight.grad = torch.tensor([1.0, 2.0, 2.0])
    LARS([weight], lr=0.5, momentum=0.0, weight_decay=0.1).step()
    torch.testing.assert_close(weight.detach(), torch.tensor([-0.5, -1.0, -1.0]))


def test_groups_exclude_bias_and_norm_from_decay_and_adaptation() -> None:
    model = small_model()
    config = OptimConfig(optimizer="lars", lr=0.2, weight_decay=1.5e-6, exclude_bias_and_norm=True)
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, LARS)
    decay, excluded = optimizer.param_groups
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in excluded["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[2].bias),
    }
    assert (decay["weight_decay"], decay["lars_exclude"]) == (1.5e-6, False)
    assert (excluded["weight_decay"], excluded["lars_exclude"]) == (0.0, True)

    everything = build_optimizer(model, OptimConfig(optimizer="sgd", weight_decay=0.1, exclude_bias_and_norm=False))
    assert isinstance(everything, torch.optim.SGD) and len(everything.param_groups) == 1
    assert len(everything.param_groups[0]["params"]) == 6 and everything.param_groups[0]["weight_decay"] == 0.1
    assert all(p is not model.frozen for g in everything.param_groups for p in g["params"])
    assert isinstance(build_optimizer(model, OptimConfig(optimizer="adamw")), torch.optim.AdamW)


def test_lr_scaled_by_batch_over_256() -> None:
    assert base_lr(OptimConfig(lr=0.2, batch_size=4096, scale_lr_by_batch=True)) == pytest.approx(3.2)
    assert base_lr(OptimConfig(lr=0.2, batch_size=4096, scale_lr_by_batch=False)) == pytest.approx(0.2)
    optimizer = build_optimizer(
        small_model(), OptimConfig(optimizer="sgd", lr=0.3, batch_size=128, scale_lr_by_batch=True)
    )
    assert all(group["lr"] == pytest.approx(0.15) for group in optimizer.param_groups)


def lrs(config: OptimConfig, steps_per_epoch: int, steps: int) -> list[float]:
    optimizer = build_optimizer(small_model(), config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[1]["lr"] == seen[-1]
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_then_cosine_values() -> None:
    config = OptimConfig(optimizer="sgd", lr=0.4, epochs=10, warmup_epochs=2)
    seen = lrs(config, steps_per_epoch=5, steps=51)  # warm-up 10 steps, 50 in all
    assert seen[0] == 0.0
    assert seen[5] == pytest.approx(0.2)  # halfway through warm-up
    assert seen[10] == pytest.approx(0.4)  # end of warm-up: the base lr
    assert seen[20] == pytest.approx(0.4 * (1 + math.cos(math.pi / 4)) / 2)
    assert seen[30] == pytest.approx(0.2)  # middle of the cosine
    assert seen[50] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(seen[10:]))
    no_warmup = lrs(OptimConfig(optimizer="sgd", lr=0.4, epochs=2, warmup_epochs=0), steps_per_epoch=2, steps=3)
    assert no_warmup == pytest.approx([0.4, 0.4 * (1 + math.cos(math.pi / 4)) / 2, 0.2])


def test_scheduler_state_dict_round_trip() -> None:
    config = OptimConfig(optimizer="lars", lr=0.4, epochs=10, warmup_epochs=2)
    optimizer = build_optimizer(small_model(), config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=5)
    for _ in range(13):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # as the checkpoints are read

    fresh_optimizer = build_optimizer(small_model(), config)
    fresh = build_scheduler(
        fresh_optimizer, config, steps_per_epoch=1
    )  # a different schedule, overwritten by the state
    fresh_optimizer.load_state_dict(state["optimizer"])
    fresh.load_state_dict(state["scheduler"])
    for _ in range(20):
        optimizer.step()
        scheduler.step()
        fresh_optimizer.step()
        fresh.step()
        assert fresh.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert fresh.last_epoch == 33


def test_bad_steps_per_epoch_is_rejected() -> None:
    config = OptimConfig()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_scheduler(build_optimizer(small_model(), config), config, 0)


def test_swav_schedule_warms_up_from_and_decays_to_the_papers_lrs() -> None:
    """SwAV's main_swav.py: linear warm-up from 0.3 to the base 4.8, cosine to final_lr 0.0048 (k=0..T)."""
    config = OptimConfig(optimizer="lars", lr=4.8, epochs=10, warmup_epochs=2, warmup_start_lr=0.3, final_lr=0.0048)
    seen = lrs(config, steps_per_epoch=5, steps=51)
    assert seen[0] == pytest.approx(0.3)
    assert seen[5] == pytest.approx(0.3 + (4.8 - 0.3) * 5 / 10)  # halfway through the warm-up
    assert seen[10] == pytest.approx(4.8)
    assert seen[30] == pytest.approx(0.0048 + (4.8 - 0.0048) / 2)  # middle of the cosine
    assert seen[50] == pytest.approx(0.0048)
    assert all(a >= b for a, b in itertools.pairwise(seen[10:]))
