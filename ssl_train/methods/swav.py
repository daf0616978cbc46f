"""SwAV (Caron et al. 2020, arXiv 2006.09882): predict one crop's cluster codes from another crop.

Each crop gives a normalised projection z and scores ``z . c_k`` against K unit-norm
prototypes. The two global crops' scores are turned into soft codes q by Sinkhorn-Knopp
(equal partition of the batch over the prototypes, no gradient); every crop then predicts
the codes of each global crop other than itself (swapped prediction). Structure follows
the official ``main_swav.py``: crops of one resolution share a backbone pass, the head runs
on all crops together, prototypes are kept unit-norm and frozen for the first steps, and
an optional queue of past features joins the Sinkhorn problem once it is full.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssl_train.config import TrainConfig
from ssl_train.methods.base import SSLMethod
from ssl_train.methods.heads import Prototypes, mlp

NUM_GLOBAL_CROPS = 2


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _logsumexp_over_samples(log_q: torch.Tensor) -> torch.Tensor:
    """``log sum_b exp(log_q[b, k])`` over the samples of all workers, for each prototype k."""
    peak = log_q.max(dim=0).values
    if _distributed():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    total = (log_q - peak).exp().sum(dim=0)
    if _distributed():
        dist.all_reduce(total)
    return peak + total.log()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Soft codes of ``scores [B, K]`` (z . C) by Sinkhorn-Knopp; each sample's row of the result sums to 1.

    Solves ``max_Q Tr(Q^T C^T Z) + eps H(Q)`` over the transport polytope (each prototype
    gets 1/K of the mass, each sample 1/B), whose solution is
    ``Q = diag(u) exp(C^T Z / eps) diag(v)``; u and v come from alternately normalising the
    prototype and the sample marginals, ``iterations`` times (paper Sec. 3.1, eq. 3).
    B is the global batch: with torch.distributed the sums over samples are all-reduced, as in
    the official ``distributed_sinkhorn``. The iterations run in the log domain (float32 at
    least), so a small eps cannot overflow or underflow. Returns ``B * Q`` (the paper code's
    scaling: one unit of mass per sample), without gradient.
    """
    log_q = scores.detach().to(torch.promote_types(scores.dtype, torch.float32)) / epsilon
    num_samples = torch.tensor(float(log_q.shape[0]), dtype=torch.float64, device=log_q.device)
    if _distributed():
        dist.all_reduce(num_samples)
    log_b, log_k = math.log(num_samples.item()), math.log(log_q.shape[1])
    for _ in range(iterations):
        log_q = log_q - _logsumexp_over_samples(log_q) - log_k  # prototype marginals: 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_b  # sample marginals: 1/B
    return (log_q + log_b).exp()


def swav_loss(
    scores_per_view: list[torch.Tensor], codes_per_global_view: list[torch.Tensor], temperature: float
) -> torch.Tensor:
    """Swapped prediction: every crop v != i predicts the codes q_i of global crop i (paper eq. 1-2).

    ``l(z_v, q_i) = - sum_k q_ik log softmax(z_v . C / temperature)_k``, averaged over the batch,
    over the ``views - 1`` predicting crops and over the global crops, as the official main_swav.py.
    The first ``len(codes_per_global_view)`` views are the global crops the codes belong to.
    """
    num_views = len(scores_per_view)
    if num_views < 2 or not 1 <= len(codes_per_global_view) <= num_views:
        raise ValueError(
            f"need >= 2 views and 1..{num_views} code sets, got {num_views} and {len(codes_per_global_view)}"
        )
    log_p = [F.log_softmax(scores.float() / temperature, dim=1) for scores in scores_per_view]
    loss = scores_per_view[0].new_zeros((), dtype=torch.float32)
    for i, codes in enumerate(codes_per_global_view):
        predictions = sum(-(codes * log_p[v]).sum(dim=1).mean() for v in range(num_views) if v != i)
        loss = loss + predictions / (num_views - 1)
    return loss / len(codes_per_global_view)


class SwAV(SSLMethod):
    """Backbone, projection head, unit-norm prototypes and an optional feature queue (persistent buffer)."""

    def __init__(self, backbone: nn.Module, config: TrainConfig) -> None:
        super().__init__()
        self.cfg = config.swav
        self.backbone = backbone
        self.projector = mlp(backbone.feature_dim, self.cfg.projector_hidden_dim, self.cfg.projector_out_dim)
        self.prototypes = Prototypes(self.cfg.projector_out_dim, self.cfg.num_prototypes,
                                     self.cfg.freeze_prototypes_steps)
        # Each worker keeps its own features (the official code: one queue per rank).
        self.register_buffer("queue", torch.zeros(NUM_GLOBAL_CROPS, self.cfg.queue_length, self.cfg.projector_out_dim))

    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """L2-normalised projections z of all crops, concatenated in view order.

        Consecutive crops of one resolution share a backbone pass; the head sees all crops at once
        (as the official multi-resolution forward).
        """
        groups = itertools.groupby(views, key=lambda view: view.shape[-2:])
        features = torch.cat([self.backbone(torch.cat(list(group))) for _, group in groups])
        return F.normalize(self.projector(features), dim=1)

    def forward(self, views: list[torch.Tensor], step: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Swapped-prediction loss over 2 global + V local crops; also z of view 1."""
        if len(views) < NUM_GLOBAL_CROPS:
            raise ValueError(
                f"SwAV needs {NUM_GLOBAL_CROPS} global crops (+ optional local crops), got {len(views)} views"
            )
        sizes = [view.shape[0] for view in views]
        z = self.embed(views)
        scores = self.prototypes(z).split(sizes)
        z_global = z.split(sizes)[:NUM_GLOBAL_CROPS]
        codes = self.assign_codes(list(scores[:NUM_GLOBAL_CROPS]), list(z_global), epoch)
        return swav_loss(list(scores), codes, self.cfg.temperature), z_global[0].detach().float()

    def _local_queue_length(self) -> int:
        """This worker's share of ``swav.queue_length``, so the global queue does not grow with the workers."""
        return self.queue.shape[1] // (dist.get_world_size() if _distributed() else 1)

    @torch.no_grad()
    def assign_codes(self, scores: list[torch.Tensor], z: list[torch.Tensor], epoch: int) -> list[torch.Tensor]:
        """Sinkhorn codes of the global crops, without gradient; then their z enter the queue.

        From ``swav.queue_start_epoch`` on (and ``swav.queue_length > 0``) each global crop's queue
        is filled FIFO with that crop's z; once full (its last row non-zero, as the official code
        checks), the queue's scores are prepended before Sinkhorn and only the batch's codes kept.
        """
        length = self._local_queue_length() if epoch >= self.cfg.queue_start_epoch else 0
        codes = []
        for i, (crop_scores, crop_z) in enumerate(zip(scores, z, strict=True)):
            crop_scores = crop_scores.float()
            if length > 0:
                queue = self.queue[i, :length]
                if bool(queue[-1].any()):
                    crop_scores = torch.cat([self.prototypes(queue).float(), crop_scores])
                queue.copy_(torch.cat([crop_z.detach().to(queue.dtype), queue])[:length])
            batch = crop_z.shape[0]
            codes.append(sinkhorn(crop_scores, self.cfg.epsilon, self.cfg.sinkhorn_iterations)[-batch:])
        return codes

    @torch.no_grad()
    def take_values(self, config: TrainConfig) -> None:
        self.cfg = config.swav  # epsilon and temperature; a schedule changes nothing else of it

    def on_resume(self, world_size: int, saved_world_size: int) -> str | None:
        """Empty the feature queue when a resumed run has, or had, 2+ workers.

        A checkpoint holds rank 0's queue only; if every worker reloaded it, the global Sinkhorn problem
        would hold W copies of the same features until the queues refill. A one-worker run keeps its
        own queue (so 2 + 2 epochs still equal 4).
        """
        if world_size == 1 and saved_world_size == 1 or not bool(self.queue.any()):
            return None
        self.queue.zero_()
        return (f"SwAV: the feature queues start empty after this resume with {world_size} workers (the checkpoint "
                f"holds one worker's queue); they refill after about swav.queue_length / batch_size steps")

    def before_optimizer_step(self, step: int) -> None:
        """Drop the prototypes' gradient while ``step < swav.freeze_prototypes_steps`` (paper: first epoch)."""
        self.prototypes.drop_grad_while_frozen(step)

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Project the prototypes back onto the unit sphere."""
        self.prototypes.normalize_()
        return {}
