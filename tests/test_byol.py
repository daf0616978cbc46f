"""BYOL maths: EMA, tau schedule, loss, stop-gradient, symmetry, and which parameters train."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_train.config import TrainConfig
from ssl_train.methods import build_method
from ssl_train.methods.byol import BYOL, byol_loss, ema_update_, tau_schedule


def tiny_backbone() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    net.feature_dim = 8
    return net


def make_byol(tau_base: float = 0.9) -> BYOL:
    torch.manual_seed(0)
    config = TrainConfig()
    config.byol.tau_base = tau_base
    config.byol.projector_hidden_dim, config.byol.projector_out_dim, config.byol.predictor_hidden_dim = 16, 6, 12
    return build_method(tiny_backbone(), config)


def views(batch: int = 6, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=generator) for _ in range(2)]


def target_pairs(model: BYOL) -> list[tuple[torch.Tensor, torch.Tensor]]:
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    target = [*model.target_backbone.parameters(), *model.target_projector.parameters()]
    return list(zip(target, online, strict=True))


def test_byol_loss_hand_values() -> None:
    assert byol_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(2.0)
    assert byol_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 4.0]])).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(2 - math.sqrt(2))
    # Batch mean of the three cases above; scale does not matter (cosine).
    p = torch.tensor([[1.0, 0.0], [3.0, 4.0], [2.0, 0.0]])
    z = torch.tensor([[0.0, 1.0], [6.0, 8.0], [5.0, 5.0]])
    assert byol_loss(p, z).item() == pytest.approx((2.0 + 0.0 + 2 - math.sqrt(2)) / 3)


def test_byol_loss_stops_gradient_into_z() -> None:
    p = torch.randn(4, 5, requires_grad=True)
    z = torch.randn(4, 5, requires_grad=True)
    byol_loss(p, z).backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_tau_schedule_endpoints_and_middle() -> None:
    assert tau_schedule(0, 100, 0.996) == pytest.approx(0.996)
    assert tau_schedule(100, 100, 0.996) == pytest.approx(1.0)
    assert tau_schedule(50, 100, 0.996) == pytest.approx(1 - 0.004 * 0.5)  # cos(pi/2) = 0
    assert tau_schedule(25, 75, 0.99) == pytest.approx(1 - 0.01 * 0.75)  # cos(pi/3) = 1/2
    assert tau_schedule(500, 100, 0.99) == pytest.approx(1.0)  # clipped past the end
    with pytest.raises(ValueError, match="total_steps"):
        tau_schedule(0, 0, 0.99)


def test_ema_update_matches_formula_and_keeps_buffers() -> None:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    target = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        for p in [*online.parameters(), *target.parameters()]:
            p.normal_()
        online[1].running_mean.fill_(5.0)
        target[1].running_mean.fill_(-1.0)
    before = [p.clone() for p in target.parameters()]
    ema_update_(target, online, 0.75)
    for new, old, theta in zip(target.parameters(), before, online.parameters(), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * theta)
    assert torch.equal(target[1].running_mean, torch.full((3,), -1.0))
    with pytest.raises(ValueError, match="same architecture"):
        ema_update_(target, nn.Linear(4, 3), 0.5)


def test_target_starts_equal_and_has_no_trainable_parameters() -> None:
    model = make_byol()
    for target, online in target_pairs(model):
        assert torch.equal(target, online)
        assert not target.requires_grad
    assert len(target_pairs(model)) == 4 + 6  # conv + BN in f; Linear, BN, Linear in g
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(name.startswith("target_") for name in trainable)


def test_no_gradient_reaches_target_and_optimizer_leaves_it() -> None:
    model = make_byol()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss, embeddings = model(views(), step=0, epoch=0)
    loss.backward()
    for target, online in target_pairs(model):
        assert target.grad is None
        assert online.grad is not None
    # Every trainable parameter gets a gradient: DDP's find_unused_parameters=False holds.
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    before = [t.clone() for t, _ in target_pairs(model)]
    online_before = [o.clone() for _, o in target_pairs(model)]
    model.before_optimizer_step(0)
    optimizer.step()
    assert all(torch.equal(t, b) for (t, _), b in zip(target_pairs(model), before, strict=True))
    assert any(not torch.equal(o, b) for (_, o), b in zip(target_pairs(model), online_before, strict=True))

    extras = model.after_optimizer_step(step=3, total_steps=10)
    tau = tau_schedule(3, 10, 0.9)
    assert extras == {"tau": pytest.approx(tau)}
    for (target, online), old in zip(target_pairs(model), before, strict=True):
        torch.testing.assert_close(target, tau * old + (1 - tau) * online)
    assert embeddings.shape == (6, 6) and not embeddings.requires_grad
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(6))


def test_loss_is_symmetric_and_runs_views_separately() -> None:
    model = make_byol()
    model.after_optimizer_step(0, 10)  # make the target differ from the online network
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(0.1 * torch.randn_like(p))
    v1, v2 = views()
    with torch.no_grad():
        loss, _ = model([v1, v2], 0, 0)
        swapped, _ = model([v2, v1], 0, 0)
        # Train mode, each view through the networks on its own (BatchNorm statistics per view).
        z = [model.projector(model.backbone(v)) for v in (v1, v2)]
        t = [model.target_projector(model.target_backbone(v)) for v in (v1, v2)]
        by_hand = byol_loss(model.predictor(z[0]), t[1]) + byol_loss(model.predictor(z[1]), t[0])
    torch.testing.assert_close(loss, swapped)
    torch.testing.assert_close(loss, by_hand)
    assert 0.0 < loss.item() < 8.0


def test_byol_rejects_extra_views() -> None:
    with pytest.raises(ValueError, match="num_local_crops"):
        make_byol()([*views(), torch.randn(6, 3, 4, 4)], 0, 0)
