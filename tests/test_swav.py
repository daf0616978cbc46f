"""SwAV maths: Sinkhorn-Knopp, swapped prediction, prototypes, multi-crop, queue, and 2 workers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ssl_train.config import TrainConfig
from ssl_train.methods import build_method
from ssl_train.methods.swav import SwAV, sinkhorn, swav_loss
from ssl_train.training.loop import train_step


def tiny_backbone() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    net.feature_dim = 8
    return net


def make_swav(**swav: object) -> SwAV:
    torch.manual_seed(0)
    config = TrainConfig(method="swav")
    config.swav.projector_hidden_dim, config.swav.projector_out_dim, config.swav.num_prototypes = 16, 6, 5
    for key, value in swav.items():
        setattr(config.swav, key, value)
    return build_method(tiny_backbone(), config)


def crops(batch: int = 8, local: int = 0, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, 8, 8, generator=generator) for _ in range(2)]
    return views + [torch.randn(batch, 3, 4, 4, generator=generator) for _ in range(local)]


def random_scores(batch: int, prototypes: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, prototypes, generator=generator, dtype=dtype) * 2 - 1


def dense_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The paper's ``Q = diag(u) exp(C^T Z / eps) diag(v)`` in float64, Q as [K, B] (prototypes x samples)."""
    kernel = torch.exp(scores.double().T / epsilon)
    num_prototypes, batch = kernel.shape
    u, v = torch.ones(num_prototypes, dtype=torch.float64), torch.ones(batch, dtype=torch.float64)
    for _ in range(iterations):
        u = (1 / num_prototypes) / (kernel @ v)  # rows (prototypes) sum to 1/K
        v = (1 / batch) / (kernel.T @ u)  # columns (samples) sum to 1/B
    return torch.diag(u) @ kernel @ torch.diag(v)


# ---------------------------------------------------------------- Sinkhorn-Knopp


def test_sinkhorn_marginals_are_uniform() -> None:
    batch, prototypes = 24, 7
    scores = random_scores(batch, prototypes)
    codes = sinkhorn(scores, epsilon=0.05, iterations=50)
    q = codes / batch  # the transport plan, total mass 1
    assert (codes >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.full((batch,), 1 / batch, dtype=torch.float64))
    assert (q.sum(dim=0) - 1 / prototypes).abs().max() < 1e-3
    # With the paper's 3 iterations, the sample marginals (normalised last) are exact.
    few = sinkhorn(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(few.sum(dim=1), torch.ones(batch, dtype=torch.float64))


def test_sinkhorn_matches_the_dense_formula() -> None:
    for seed, (batch, prototypes, iterations) in enumerate([(16, 5, 3), (10, 12, 1), (32, 9, 20)]):
        scores = random_scores(batch, prototypes, seed=seed)
        expected = dense_sinkhorn(scores, epsilon=0.1, iterations=iterations).T * batch
        torch.testing.assert_close(sinkhorn(scores, 0.1, iterations), expected)
        # float32 input: computed in float32, same answer to float32 precision
        torch.testing.assert_close(sinkhorn(scores.float(), 0.1, iterations), expected.float(), rtol=1e-4, atol=1e-6)


def test_sinkhorn_large_epsilon_is_uniform() -> None:
    codes = sinkhorn(random_scores(12, 4), epsilon=1e3, iterations=3)
    torch.testing.assert_close(codes, torch.full((12, 4), 0.25, dtype=torch.float64), atol=1e-3, rtol=0)


def test_sinkhorn_small_epsilon_approaches_argmax() -> None:
    prototypes, per_prototype = 6, 4
    batch = prototypes * per_prototype
    labels = torch.arange(batch) % prototypes  # balanced: the argmax is itself an equal partition
    scores = random_scores(batch, prototypes, seed=3, dtype=torch.float32) * 0.5 - 0.5  # in [-1, 0]
    scores[torch.arange(batch), labels] = 1.0
    for epsilon in (0.01, 0.005):
        codes = sinkhorn(scores, epsilon, iterations=3)
        torch.testing.assert_close(codes, nn.functional.one_hot(labels, prototypes).float(), atol=1e-4, rtol=0)


def test_sinkhorn_is_stable_in_float32_for_small_epsilon() -> None:
    scores = random_scores(256, 30, seed=5, dtype=torch.float32)  # [-1, 1]: exp(2 / eps) = e^200
    for epsilon in (0.01, 0.005):
        codes = sinkhorn(scores, epsilon, iterations=3)
        assert codes.dtype == torch.float32
        assert torch.isfinite(codes).all()
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(256))


def test_sinkhorn_codes_carry_no_gradient() -> None:
    scores = random_scores(8, 3, dtype=torch.float32).requires_grad_(True)
    codes = sinkhorn(scores * 2, 0.05, 3)
    assert not codes.requires_grad and codes.grad_fn is None


# ---------------------------------------------------------------- swapped prediction


def test_swav_loss_two_views_by_hand() -> None:
    # temperature 1; view 0 predicts softmax [1/2, 1/2], view 1 predicts [3/4, 1/4].
    scores = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])]
    codes = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])]
    # q_0 predicted by view 1: -log(3/4); q_1 predicted by view 0: -(1/2 log 1/2 + 1/2 log 1/2) = log 2.
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert swav_loss(scores, codes, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # temperature scales the scores before the softmax: scores * 10 at temperature 10 is the same.
    assert swav_loss([s * 10 for s in scores], codes, 10.0).item() == pytest.approx(expected, rel=1e-6)


def test_swav_loss_multi_crop_by_hand() -> None:
    # A local crop (view 2) predicts both global codes; it has no codes of its own: 2 * (3 - 1) terms.
    scores = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, math.log(3.0)]])]
    codes = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])]
    for_q0 = (math.log(4 / 3) + math.log(4)) / 2  # predicted by view 1 ([3/4, 1/4]) and view 2 ([1/4, 3/4])
    for_q1 = (math.log(2) + 0.5 * (math.log(4) + math.log(4 / 3))) / 2  # by view 0 and view 2
    assert swav_loss(scores, codes, 1.0).item() == pytest.approx((for_q0 + for_q1) / 2, rel=1e-6)


# ---------------------------------------------------------------- the SwAV module


def test_prototypes_are_unit_norm_at_init_and_after_a_step() -> None:
    model = make_swav(freeze_prototypes_steps=0)
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(5))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss, embeddings = model(crops(), 0, 0)
    loss.backward()
    model.before_optimizer_step(0)
    optimizer.step()
    assert (model.prototypes.weight.norm(dim=1) - 1).abs().max() > 1e-3  # the raw step leaves the sphere
    assert model.after_optimizer_step(0, 10) == {}
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(5))
    assert embeddings.shape == (8, 6) and not embeddings.requires_grad
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(8))


def test_prototypes_frozen_for_the_first_steps() -> None:
    model = make_swav(freeze_prototypes_steps=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    start = model.prototypes.weight.detach().clone()
    backbone_start = model.backbone[0].weight.detach().clone()
    history = []
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        model(crops(seed=step), step, 0)[0].backward()
        assert model.prototypes.weight.grad is not None  # used in the forward (DDP needs that)
        model.before_optimizer_step(step)
        optimizer.step()
        model.after_optimizer_step(step, 3)
        history.append(model.prototypes.weight.detach().clone())
    torch.testing.assert_close(history[0], start, atol=1e-6, rtol=0)
    torch.testing.assert_close(history[1], start, atol=1e-6, rtol=0)
    assert (history[2] - start).abs().max() > 1e-3
    assert not torch.equal(model.backbone[0].weight, backbone_start)  # the rest trains meanwhile


def test_multi_crop_codes_come_from_the_global_crops_only() -> None:
    model = make_swav().eval()  # BatchNorm in eval mode: per-view forward passes are comparable
    views = crops(local=3)
    with torch.no_grad():
        loss, _ = model(views, 0, 0)
        z = [nn.functional.normalize(model.projector(model.backbone(v)), dim=1) for v in views]
        scores = [model.prototypes(zv) for zv in z]
        codes = [sinkhorn(s, model.cfg.epsilon, model.cfg.sinkhorn_iterations) for s in scores[:2]]
        changed = [*views[:2], torch.randn_like(views[2]), *views[3:]]
        changed_codes = model.assign_codes([model.prototypes(model.embed(changed)[:8])], [z[0]], 0)
    torch.testing.assert_close(loss, swav_loss(scores, codes, model.cfg.temperature))
    torch.testing.assert_close(changed_codes[0], codes[0])


def test_queue_fills_fifo_and_joins_sinkhorn_once_full() -> None:
    batch = 4
    model = make_swav(queue_length=2 * batch, queue_start_epoch=1).eval()
    assert model.state_dict()["queue"].shape == (2, 2 * batch, 6)
    with torch.no_grad():
        model(crops(batch, seed=0), 0, epoch=0)
        assert not model.queue.any()  # before queue_start_epoch nothing is stored
        embeddings = []
        for step in range(2):
            views = crops(batch, seed=step + 1)
            embeddings.append(model.embed(views).split(batch))
            model(views, step, epoch=1)
        # FIFO: the newest batch first, then the one before.
        for crop in range(2):
            torch.testing.assert_close(model.queue[crop, :batch], embeddings[1][crop])
            torch.testing.assert_close(model.queue[crop, batch:], embeddings[0][crop])

        # Full: the queue's scores join Sinkhorn, only the batch's own codes come back.
        queue_before = model.queue.clone()
        z = model.embed(crops(batch, seed=9)).split(batch)[:2]
        scores = [model.prototypes(zi) for zi in z]
        codes = model.assign_codes(scores, list(z), epoch=1)
    assert [c.shape for c in codes] == [(batch, 5), (batch, 5)]
    for crop in range(2):
        joint = torch.cat([model.prototypes(queue_before[crop]), scores[crop]])
        expected = sinkhorn(joint, model.cfg.epsilon, model.cfg.sinkhorn_iterations)[-batch:]
        torch.testing.assert_close(codes[crop], expected)
        assert not torch.allclose(codes[crop], sinkhorn(scores[crop], model.cfg.epsilon, 3))
    torch.testing.assert_close(model.queue[:, :batch], torch.stack(z))


def test_swav_rejects_a_single_view() -> None:
    with pytest.raises(ValueError, match="global crops"):
        make_swav()([torch.randn(4, 3, 8, 8)], 0, 0)


# ---------------------------------------------------------------- two workers (gloo)


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        scores = random_scores(20, 6, seed=11, dtype=torch.float32)
        shard = scores[rank * 12 : 12 + rank * 8]  # uneven shards: 12 + 8 rows
        codes = sinkhorn(shard, 0.05, 3)

        method = make_swav(freeze_prototypes_steps=2, queue_length=8, queue_start_epoch=0)
        model = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
        optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9)
        prototypes = []
        for step in range(3):
            train_step(model, method, optimizer, None, crops(batch=4, local=2, seed=10 * step + rank), step, 0, 3)
            prototypes.append(method.prototypes.weight.detach().clone())
        torch.save({"codes": codes, "prototypes": prototypes, "queue": method.queue}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_share_one_sinkhorn_and_train_under_ddp(tmp_path) -> None:
    """Sinkhorn over 2 shards equals Sinkhorn over the whole batch; DDP (no unused parameters) runs."""
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole = sinkhorn(random_scores(20, 6, seed=11, dtype=torch.float32), 0.05, 3)
    torch.testing.assert_close(torch.cat([ranks[0]["codes"], ranks[1]["codes"]]), whole)
    start = make_swav().prototypes.weight.detach()
    for rank in ranks:
        torch.testing.assert_close(rank["prototypes"][1], start, atol=1e-6, rtol=0)  # frozen for 2 steps
        assert (rank["prototypes"][2] - start).abs().max() > 1e-4
        assert rank["queue"].shape == (2, 8, 6) and rank["queue"][:, :4].any() and not rank["queue"][:, 4:].any()
    torch.testing.assert_close(ranks[0]["prototypes"][2], ranks[1]["prototypes"][2])


def test_queues_start_empty_after_a_resume_with_two_workers(tmp_path):
    """A checkpoint holds rank 0's queue only: a 2-worker resume must not give every worker that copy."""
    from test_loop import TINY

    from ssl_train.config import load_config
    from ssl_train.data import load_splits
    from ssl_train.training.checkpoint import load_checkpoint
    from ssl_train.training.loop import WorkerContext, train_loop

    config = load_config(overrides=[*TINY, "method=swav", "optim.epochs=1", "optim.warmup_epochs=0",
                                    "swav.queue_length=256", "swav.queue_start_epoch=0"])
    splits = load_splits(config.data)
    first = train_loop(config, lambda m, c: None, WorkerContext(checkpoint_dir=tmp_path), splits=splits)
    saved = load_checkpoint(first.checkpoint)["method"]["queue"]
    assert saved.any()  # the run filled its queue
    # Resumed at its last epoch, so what the loop returns is the method as the resume left it.
    alone = train_loop(config, lambda m, c: None, WorkerContext(), checkpoint=first.checkpoint, splits=splits)
    assert torch.equal(alone.method.queue, saved)  # one worker keeps its own queue (bitwise resume)
    for rank in (0, 1):
        resumed = train_loop(config, lambda m, c: None, WorkerContext(rank=rank, world_size=2),
                             checkpoint=first.checkpoint, splits=splits)
        assert not resumed.method.queue.any()  # each of 2 workers starts with an empty queue, not rank 0's copy
