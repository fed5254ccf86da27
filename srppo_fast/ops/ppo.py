"""PPO losses: the clipped surrogate for the actor and the clipped value loss for the critic.

Any shape works ([B, T] padded or [N] packed), as long as every tensor and `mask` share it.
Losses and stats are token sums divided by `normalizer` (default: the mask's token count), so the
values of micro-batches of one optimizer step add up to the step's token mean when they are all
given the step's token count.

    ratio   = exp(logp - old_logp)
    pg      = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))
    actor   = pg + kl_coef * KL(logp || ref_logp) - entropy_coef * entropy
    v_clip  = old_v + clip(v - old_v, -value_clip, value_clip)
    critic  = 0.5 * max((v - R)^2, (v_clip - R)^2)      (0.5 * (v - R)^2 without value_clip)
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1, k2, k3)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # exp(-x) - 1 + x >= 0, computed without cancellation
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def _normalizer(mask: torch.Tensor, normalizer: float | None):
    return float(normalizer) if normalizer is not None else mask.to(torch.float32).sum().clamp_min(1.0)


def policy_loss_ref(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    clip_eps: float = 0.2, clip_eps_high: float | None = None, entropy: torch.Tensor | None = None,
                    entropy_coef: float = 0.0, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                    kl_estimator: KLEstimator = "k3", normalizer: float | None = None) -> tuple[torch.Tensor, dict]:
    """The actor's loss (clipped surrogate + KL + entropy terms) and its stats (detached)."""
    m = mask.to(torch.float32)
    norm = _normalizer(mask, normalizer)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = (logp.float() - old_logp.float()) * m
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    loss = (torch.maximum(unclipped, clipped) * m).sum() / norm
    stats = {
        "pg_loss": loss.detach(),
        "clip_frac": ((clipped > unclipped).float() * m).sum() / norm,
        "approx_kl": ((torch.expm1(-log_ratio) + log_ratio) * m).sum() / norm,  # k3 of old vs new
    }
    if entropy is not None:
        ent = (entropy.float() * m).sum() / norm
        stats["entropy"] = ent.detach()
        loss = loss - entropy_coef * ent
    if ref_logp is not None and kl_coef:
        kl = (kl_estimate(logp.float(), ref_logp.float(), kl_estimator) * m).sum() / norm
        stats["kl_loss"] = kl.detach()
        loss = loss + kl_coef * kl
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss_ref(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                   value_clip: float | None = 0.2, normalizer: float | None = None) -> tuple[torch.Tensor, dict]:
    """The critic's (clipped) squared error and its stats (detached)."""
    m = mask.to(torch.float32)
    norm = _normalizer(mask, normalizer)
    v, ret = values.float(), returns.float()
    err = (v - ret) ** 2
    stats = {}
    if value_clip is not None:
        v_clipped = old_values.float() + (v - old_values.float()).clamp(-value_clip, value_clip)
        err_clipped = (v_clipped - ret) ** 2
        stats["value_clip_frac"] = (((err_clipped > err).float() * m).sum() / norm).detach()
        err = torch.maximum(err, err_clipped)
    loss = 0.5 * (err * m).sum() / norm
    stats["value_loss"] = loss.detach()
    return loss, stats


def ppo_loss_ref(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                 values: torch.Tensor | None = None, old_values: torch.Tensor | None = None,
                 returns: torch.Tensor | None = None, value_clip: float | None = 0.2,
                 normalizer: float | None = None, **policy_kwargs) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The specification: (actor_loss, critic_loss or None, stats)."""
    actor, stats = policy_loss_ref(logp, old_logp, advantages, mask, normalizer=normalizer, **policy_kwargs)
    critic = None
    if values is not None:
        critic, value_stats = value_loss_ref(values, old_values, returns, mask, value_clip=value_clip,
                                             normalizer=normalizer)
        stats.update(value_stats)
    return actor, critic, stats


def ppo_loss(logp, old_logp, advantages, mask, impl: str = "auto", **kwargs):
    """Clipped PPO losses (see module doc). impl: "auto" | "torch"."""
    if impl not in ("auto", "torch"):
        raise ValueError(f"ppo_loss: unknown impl {impl!r}")
    return ppo_loss_ref(logp, old_logp, advantages, mask, **kwargs)


def value_loss(values, old_values, returns, mask, impl: str = "auto", **kwargs):
    """The critic's clipped value loss alone (critic-only warm-up). impl: "auto" | "torch"."""
    if impl not in ("auto", "torch"):
        raise ValueError(f"value_loss: unknown impl {impl!r}")
    return value_loss_ref(values, old_values, returns, mask, **kwargs)
