"""Step 5: PPO epochs over minibatches of a rollout buffer, the actor's and the critic's losses in one backward."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from .. import dist
from ..batching import dummy_batch, rank_microbatches
from ..engine import backward_together
from ..experience import (
    Experience,
    flat,
    packed_label_logprobs,
    packed_response_values,
)
from ..ops import (
    ppo_loss,
    value_loss,
)
from .models import RLModels

log = logging.getLogger("srppo_fast")


def minibatch_losses(models: RLModels, exp: Experience, batch, rows: np.ndarray, n_tokens: int,
                     train_actor: bool) -> dict:
    """Forward one packed micro-batch through the actor and/or critic, compute both PPO losses in one op
    (ops.ppo_loss; ops.value_loss during the critic-only warm-up), and backpropagate them together."""
    rl, ppo, device = models.rl, models.rl.ppo, models.ctx.device
    kl_in_loss = rl.kl.placement == "loss" and rl.kl.coef > 0

    def take(x):  # the rows' response-token entries, in packed order
        return flat(x, exp.mask, rows).to(device)

    ones = torch.ones(int(exp.mask[torch.as_tensor(rows)].sum()), dtype=torch.bool, device=device)
    values = None
    if models.critic is not None:
        with models.critic.autocast():
            values = packed_response_values(models.critic.model, batch)
    critic = dict(old_values=take(exp.values), returns=take(exp.returns), value_clip=ppo.value_clip) \
        if values is not None else {}
    if train_actor:
        with models.actor.autocast():
            logp, ent = packed_label_logprobs(models.actor.model, batch, rl.rollout.temperature,
                                                 return_entropy=True)
        actor_loss, critic_loss, stats = ppo_loss(
            logp, take(exp.old_logp), take(exp.advantages), ones, clip_eps=ppo.clip_eps,
            clip_eps_high=ppo.clip_eps_high, entropy=ent, entropy_coef=ppo.entropy_coef,
            ref_logp=take(exp.ref_logp) if kl_in_loss else None, kl_coef=rl.kl.coef if kl_in_loss else 0.0,
            kl_estimator=rl.kl.estimator, dual_clip=ppo.dual_clip, values=values, normalizer=n_tokens, **critic)
    else:
        actor_loss = None
        critic_loss, stats = value_loss(values, mask=ones, normalizer=n_tokens, **critic)
    # one pass when the engines allow it: the fused op computes both gradients at once
    backward_together([(engine, loss) for engine, loss in ((models.actor, actor_loss), (models.critic, critic_loss))
                       if loss is not None])
    return stats


def dummy_losses(models: RLModels, train_actor: bool) -> None:
    """A rank with no sequences left in this minibatch: forward and backward a dummy micro-batch with weight 0
    (the collectives of ZeRO need every rank in every forward and backward)."""
    batch = dummy_batch().to(models.ctx.device)
    losses = []
    if train_actor:
        with models.actor.autocast():
            losses.append(packed_label_logprobs(models.actor.model, batch).sum() * 0.0)
    if models.critic is not None:
        with models.critic.autocast():
            losses.append(packed_response_values(models.critic.model, batch).sum() * 0.0)
    engines = [e for e in (models.actor if train_actor else None, models.critic) if e is not None]
    backward_together(list(zip(engines, losses)))


def ppo_update(models: RLModels, exp: Experience, train_actor: bool, seed: int = 0) -> dict:
    """PPO epochs over minibatches of the buffer (the same minibatches on every rank, each rank running its
    balanced share of each); token-mean losses over each minibatch, whatever the world size."""
    ppo = models.rl.ppo
    sums: dict[str, float] = {}
    n_minibatches = 0
    rng = np.random.default_rng(seed)
    imbalance = []
    for _ in range(ppo.epochs):
        order = rng.permutation(len(exp.sequences))
        for start in range(0, len(order), ppo.train_batch_size):
            ids = order[start:start + ppo.train_batch_size]
            n_tokens = int(exp.mask[torch.as_tensor(ids)].sum())
            minibatch: dict[str, float] = {}
            share = rank_microbatches(exp.sequences, ids, ppo.micro_batch_tokens, dist.rank(), dist.world_size())
            imbalance.append(share.imbalance)
            for batch in share.batches:
                if batch is None:
                    dummy_losses(models, train_actor)
                    continue
                _accumulate(minibatch, minibatch_losses(models, exp, batch.to(models.ctx.device), batch.seq_ids,
                                                        n_tokens, train_actor))
            if dist.world_size() > 1:  # token sums / n_tokens: summed over the ranks, the minibatch's
                keys = sorted(set().union(*dist.all_gather_object(sorted(minibatch))))
                minibatch = dist.all_reduce_dict({k: minibatch.get(k, 0.0) for k in keys})
            _accumulate(sums, minibatch)
            if train_actor:
                actor_ok = all(math.isfinite(minibatch.get(k, 0.0)) for k in ("pg_loss", "kl_loss", "entropy"))
                _accumulate(sums, {f"actor_{k}": v for k, v in models.actor.step(actor_ok).items()})
            if models.critic is not None:
                critic_ok = math.isfinite(minibatch.get("value_loss", 0.0))
                _accumulate(sums, {f"critic_{k}": v for k, v in models.critic.step(critic_ok).items()})
            n_minibatches += 1
    out = {k: v / max(n_minibatches, 1) for k, v in sums.items()}
    if dist.world_size() > 1:
        out["rank_imbalance"] = float(np.mean(imbalance))
    return out


def _accumulate(sums: dict, stats: dict) -> None:
    for k, v in stats.items():
        sums[k] = sums.get(k, 0.0) + float(v)
