"""PPO losses: the clipped surrogate for the actor and the clipped value loss for the critic.

Any shape and memory layout works ([B, T] padded or [N] packed), as long as every tensor and `mask`
share the shape. The mask is boolean: a float or integer mask means mask != 0 (ops/_triton.py), in
both implementations, so a token is in or out, never weighted (off-mask entries are multiplied by 0:
they must be finite). Losses and stats are token sums divided by `normalizer` (> 0; default: the
mask's token count), so the values of micro-batches of one optimizer step add up to the step's token
mean when they are all given the step's token count.

    x       = clamp(logp - old_logp, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio   = exp(x)
    pg      = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))
    pg      = min(pg, -A * dual_clip)   where A < 0, with dual_clip (> 1; dual-clip PPO, Ye et al. 2020)
    actor   = pg + kl_coef * KL(logp || ref_logp) - entropy_coef * entropy
    v_clip  = clamp(v, old_v - value_clip, old_v + value_clip)
    critic  = 0.5 * max((v - R)^2, (v_clip - R)^2)      (0.5 * (v - R)^2 without value_clip)

    approx_kl (a stat) = mean of exp(x) - 1 - x: Schulman's k3 estimate of KL(pi_old || pi) from the
        tokens, which are samples of pi_old (= kl_estimate(old_logp, logp, "k3") for |x| <= the bound)
    clip_frac = share of tokens where the clipped branch is the larger; dual_clip_frac (with dual_clip) =
        share where A < 0 and the dual clip bounds the loss; value_clip_frac = share where the clipped
        value's error is the larger (only values that moved more than value_clip: v_clip is v itself
        inside the band, bit for bit, so a value that moved less is never counted)

The log-ratio bound. LOG_RATIO_BOUND = 20, as verl and OpenRLHF clamp it: exp(20) = 4.9e8 is finite in
fp32 with room to spare (|A| exp(20) overflows only for |A| > 7e29), while an unclamped x = 100 gives
exp(100) = inf in fp32 and an inf loss that the non-finite guard skips. |x| > 20 means a token's
probability changed by a factor above 4.9e8 since it was sampled, where a healthy update moves it by
percents (the clip range is |x| < 0.2): no realistic token comes near the bound, and the clamp only keeps
a broken one (a near-impossible token whose log-prob swings between forwards, a diverged step) from
poisoning the whole step with inf. Where |x| <= 20 every loss, stat and gradient is bit for bit what the
unclamped formula gives; beyond it the ratio is exp(+-20) and the token's policy-gradient term has no
slope (torch.clamp's gradient), in both implementations. The KL term (kl_coef, against ref_logp) is not
clamped.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._triton import bool_mask, mask_bytes, resolve_impl, tl, triton

KLEstimator = Literal["k1", "k2", "k3"]
LOG_RATIO_BOUND = 20.0  # |logp - old_logp| is clamped to this before exp (module doc)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1, k2, k3), x = logp - ref_logp:
    k1 x, k2 x^2 / 2, k3 exp(-x) - 1 + x (= r - 1 - log r with r = ref / pi)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # exp(-x) - 1 + x >= 0, computed without cancellation
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def _check_dual_clip(dual_clip: float | None) -> None:
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"ppo_loss: dual_clip must be > 1 (the loss bound is dual_clip x |A|), got {dual_clip}")


def _normalizer(mask: torch.Tensor, normalizer: float | None):
    """The divisor of every token sum: `normalizer`, or the number of tokens in the (bool) mask."""
    if normalizer is not None:
        if not normalizer > 0:
            raise ValueError(f"ppo_loss: normalizer must be > 0, got {normalizer}")
        return float(normalizer)
    return mask.to(torch.float32).sum().clamp_min(1.0)


def _inv_normalizer(mask: torch.Tensor, normalizer: float | None) -> torch.Tensor:
    """1 / the normalizer as a 0-d fp32 tensor on the mask's device, computed there (the kernels load it: the
    token count never makes a round trip to the host)."""
    if normalizer is not None:
        return torch.full((), 1.0 / _normalizer(mask, normalizer), dtype=torch.float32, device=mask.device)
    return _normalizer(mask, None).reciprocal()


def policy_loss_ref(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    clip_eps: float = 0.2, clip_eps_high: float | None = None, entropy: torch.Tensor | None = None,
                    entropy_coef: float = 0.0, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                    kl_estimator: KLEstimator = "k3", dual_clip: float | None = None,
                    normalizer: float | None = None) -> tuple[torch.Tensor, dict]:
    """The actor's loss (clipped surrogate, dual clip + KL + entropy terms) and its stats (detached). A token
    counts where mask != 0."""
    _check_dual_clip(dual_clip)
    mask = bool_mask(mask)
    m = mask.to(torch.float32)
    norm = _normalizer(mask, normalizer)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = ((logp.float() - old_logp.float()) * m).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    pg = torch.maximum(unclipped, clipped)
    if dual_clip is not None:  # A < 0: the loss is at most dual_clip * |A|, with no slope where that binds
        bound = -adv * dual_clip
        dual = (adv < 0) & (pg > bound)
        pg = torch.where(dual, bound, pg)  # = min(pg, bound) where A < 0; the bound has no slope in logp
    loss = (pg * m).sum() / norm
    stats = {
        "pg_loss": loss.detach(),
        "clip_frac": ((clipped > unclipped).float() * m).sum() / norm,
        # k3 of KL(pi_old || pi) on samples of pi_old: exp(x) - 1 - x = kl_estimate(old_logp, logp, "k3")
        "approx_kl": ((torch.expm1(log_ratio) - log_ratio) * m).sum() / norm,
    }
    if dual_clip is not None:
        stats["dual_clip_frac"] = (dual.float() * m).sum() / norm
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
    """The critic's (clipped) squared error and its stats (detached). A token counts where mask != 0."""
    mask = bool_mask(mask)
    m = mask.to(torch.float32)
    norm = _normalizer(mask, normalizer)
    v, ret = values.float(), returns.float()
    err = (v - ret) ** 2
    stats = {}
    if value_clip is not None:
        old_v = old_values.float()
        v_clipped = v.clamp(old_v - value_clip, old_v + value_clip)  # v itself inside the band, bit for bit
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


# ------------------------------------------------------------------------------------------------
# kernels: one launch forward (losses and stats), one launch backward (every gradient)

STATS = ("pg_loss", "clip_frac", "approx_kl", "entropy", "kl_loss", "value_loss", "value_clip_frac",
         "dual_clip_frac")


@triton.jit
def _kl_and_grad(x, CODE: tl.constexpr):
    """(KL estimate, its derivative in x) for log ratio x: k1 x; k2 x^2 / 2; k3 exp(-x) - 1 + x."""
    if CODE == 1:
        return x, tl.full(x.shape, 1.0, tl.float32)
    elif CODE == 2:
        return 0.5 * x * x, x
    else:
        e = tl.exp(-x)
        return e - 1.0 + x, 1.0 - e


@triton.jit
def _surrogate(logp, old_logp, adv, keep, clip_low, clip_high, BOUND: tl.constexpr):
    """Clipped surrogate terms per token: (log ratio clamped to +-BOUND, ratio, unclipped -A r, clipped
    -A clip(r), the log ratio lies beyond the bound). The log ratio is 0 where the token does not count (keep
    False), as in the reference."""
    raw = tl.where(keep, logp - old_logp, 0.0)
    outside = tl.abs(raw) > BOUND  # False for a NaN, which stays NaN, as in the reference
    log_ratio = tl.where(outside, tl.where(raw > 0, BOUND, -BOUND), raw)
    ratio = tl.exp(log_ratio)
    return log_ratio, ratio, -adv * ratio, -adv * tl.minimum(tl.maximum(ratio, clip_low), clip_high), outside


@triton.jit
def _dual_clip(pg, adv, dual_clip):
    """Dual clip of the per-token loss pg: (min(pg, -A dual_clip) where A < 0, else pg; where that bound binds)."""
    bound = -adv * dual_clip
    dual = (adv < 0) & (pg > bound)
    return tl.where(dual, bound, pg), dual


@triton.jit
def _value_terms(v, old_v, ret, value_clip):
    """Clipped value loss terms per token: (clipped value, squared error, clipped squared error). The clipped
    value is v itself inside the band, so the clipped error is the larger only where v moved beyond it."""
    v_clip = tl.minimum(tl.maximum(v, old_v - value_clip), old_v + value_clip)
    return v_clip, (v - ret) * (v - ret), (v_clip - ret) * (v_clip - ret)


@triton.jit
def _ppo_fwd_kernel(
    # data ptrs: policy
    logp_ptr, old_ptr, adv_ptr, mask_ptr, entropy_ptr, ref_ptr,
    # data ptrs: value
    values_ptr, old_values_ptr, returns_ptr,
    # output: token sums / normalizer, one slot per entry of STATS
    stats_ptr,
    # shapes and scalars
    N, clip_low, clip_high, dual_clip, value_clip, inv_norm_ptr,
    # meta
    BLOCK: tl.constexpr, BOUND: tl.constexpr, HAS_POLICY: tl.constexpr, HAS_DUAL: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, HAS_KL: tl.constexpr, KL_CODE: tl.constexpr, HAS_VALUES: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    keep = tl.load(mask_ptr + offs, mask=ok, other=0) != 0  # the mask rule: in or out, never a weight
    m = tl.where(keep, tl.load(inv_norm_ptr), 0.0)  # 1 / normalizer, on the device: no host sync
    if HAS_POLICY:
        adv = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        log_ratio, ratio, unclipped, clipped, _ = _surrogate(
            tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32),
            tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32), adv, keep, clip_low, clip_high, BOUND)
        pg = tl.maximum(unclipped, clipped)
        if HAS_DUAL:
            pg, dual = _dual_clip(pg, adv, dual_clip)
            tl.atomic_add(stats_ptr + 7, tl.sum(tl.where(dual, m, 0.0), 0))
        tl.atomic_add(stats_ptr + 0, tl.sum(pg * m, 0))
        tl.atomic_add(stats_ptr + 1, tl.sum(tl.where(clipped > unclipped, m, 0.0), 0))
        tl.atomic_add(stats_ptr + 2, tl.sum((ratio - 1.0 - log_ratio) * m, 0))  # k3 of KL(pi_old || pi)
        if HAS_ENTROPY:
            tl.atomic_add(stats_ptr + 3, tl.sum(tl.load(entropy_ptr + offs, mask=ok, other=0.0).to(tl.float32) * m, 0))
        if HAS_KL:
            x = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32) - \
                tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)  # re-read (cached): fewer live registers
            kl, _ = _kl_and_grad(x, KL_CODE)
            tl.atomic_add(stats_ptr + 4, tl.sum(kl * m, 0))
    if HAS_VALUES:
        v = tl.load(values_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        old_v = tl.load(old_values_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        ret = tl.load(returns_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        _, err, err_clip = _value_terms(v, old_v, ret, value_clip)
        tl.atomic_add(stats_ptr + 5, tl.sum(0.5 * tl.maximum(err, err_clip) * m, 0))
        tl.atomic_add(stats_ptr + 6, tl.sum(tl.where(err_clip > err, m, 0.0), 0))


@triton.jit
def _ppo_bwd_kernel(
    # data ptrs: inputs
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, values_ptr, old_values_ptr, returns_ptr,
    # data ptrs: upstream gradients of the two losses (scalars on the device)
    grad_actor_ptr, grad_critic_ptr,
    # data ptrs: outputs
    grad_logp_ptr, grad_entropy_ptr, grad_values_ptr,
    # shapes and scalars
    N, clip_low, clip_high, dual_clip, value_clip, inv_norm_ptr, entropy_coef, kl_coef,
    # meta
    BLOCK: tl.constexpr, BOUND: tl.constexpr, HAS_POLICY: tl.constexpr, HAS_DUAL: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, HAS_KL: tl.constexpr, KL_CODE: tl.constexpr, HAS_VALUES: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    keep = tl.load(mask_ptr + offs, mask=ok, other=0) != 0
    m = tl.where(keep, tl.load(inv_norm_ptr), 0.0)  # 1 / normalizer, on the device: no host sync
    if HAS_POLICY:
        g = tl.load(grad_actor_ptr)
        logp = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        _, _, unclipped, clipped, outside = _surrogate(
            logp, tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32), adv, keep, clip_low, clip_high, BOUND)
        # d(-A r)/dlogp = -A r (the unclipped term); no slope where a clip binds or the log ratio is beyond the bound
        grad = tl.where((clipped > unclipped) | outside, 0.0, unclipped)
        if HAS_DUAL:
            _, dual = _dual_clip(tl.maximum(unclipped, clipped), adv, dual_clip)
            grad = tl.where(dual, 0.0, grad)
        if HAS_KL:
            _, dkl = _kl_and_grad(logp - tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32), KL_CODE)
            grad += kl_coef * dkl
        tl.store(grad_logp_ptr + offs, g * grad * m, mask=ok)
        if HAS_ENTROPY:
            tl.store(grad_entropy_ptr + offs, -g * entropy_coef * m, mask=ok)
    if HAS_VALUES:
        gc = tl.load(grad_critic_ptr)
        v = tl.load(values_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        old_v = tl.load(old_values_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        ret = tl.load(returns_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        _, err, err_clip = _value_terms(v, old_v, ret, value_clip)
        grad_v = tl.where(err_clip > err, 0.0, v - ret)  # the clipped branch wins only where v_clip is a bound
        tl.store(grad_values_ptr + offs, gc * grad_v * m, mask=ok)


# ------------------------------------------------------------------------------------------------
# launcher and autograd


PPO_BLOCK = 1024
_KL = {"k1": 1, "k2": 2, "k3": 3}


def _dual(cfg: dict) -> float:
    """dual_clip as the kernels' scalar (unused, HAS_DUAL False, when it is None)."""
    return float(cfg["dual_clip"]) if cfg["dual_clip"] is not None else 0.0


class PPOLossFunction(torch.autograd.Function):
    """Inputs flat contiguous [N], mask uint8 (mask_bytes); returns (actor loss, critic loss, stats [8]) — stats
    in the order of STATS."""

    @staticmethod
    def forward(ctx, logp, entropy, values, old_logp, advantages, mask, ref_logp, old_values, returns, cfg):
        N = mask.numel()
        stats = torch.zeros(len(STATS), dtype=torch.float32, device=mask.device)
        flags = dict(BOUND=LOG_RATIO_BOUND, HAS_POLICY=logp is not None, HAS_DUAL=cfg["dual_clip"] is not None,
                     HAS_ENTROPY=entropy is not None, HAS_KL=cfg["kl_coef"] != 0 and ref_logp is not None,
                     KL_CODE=_KL[cfg["kl_estimator"]], HAS_VALUES=values is not None)
        any_ = next(t for t in (logp, values) if t is not None)
        args = [t if t is not None else any_ for t in (logp, old_logp, advantages, mask, entropy, ref_logp, values,
                                                       old_values, returns)]
        grid = (triton.cdiv(N, PPO_BLOCK),)
        if N:
            _ppo_fwd_kernel[grid](*args, stats, N, cfg["clip_low"], cfg["clip_high"], _dual(cfg), cfg["value_clip"],
                                  cfg["inv_norm"], BLOCK=PPO_BLOCK, **flags)
        actor = stats[0] + cfg["kl_coef"] * stats[4] - cfg["entropy_coef"] * stats[3]
        critic = stats[5].clone()
        ctx.save_for_backward(*args[:4], args[5], *args[6:])
        ctx.cfg, ctx.flags, ctx.N = cfg, flags, N
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # a backward from one loss only: None, not zeros, for the other
        return actor, critic, stats

    @staticmethod
    def backward(ctx, grad_actor, grad_critic, _grad_stats):
        logp, old, adv, mask, ref, values, old_values, returns = ctx.saved_tensors
        cfg, flags, N = ctx.cfg, ctx.flags, ctx.N
        grad_logp = torch.empty_like(logp, dtype=torch.float32) if flags["HAS_POLICY"] else None
        grad_entropy = torch.empty_like(grad_logp) if flags["HAS_ENTROPY"] else None
        grad_values = torch.empty_like(values, dtype=torch.float32) if flags["HAS_VALUES"] else None
        zero = torch.zeros((), device=mask.device)
        g_actor = (grad_actor if grad_actor is not None else zero).float().reshape(())
        g_critic = (grad_critic if grad_critic is not None else zero).float().reshape(())
        fill = grad_logp if grad_logp is not None else grad_values
        if N:
            _ppo_bwd_kernel[(triton.cdiv(N, PPO_BLOCK),)](
                logp, old, adv, mask, ref, values, old_values, returns, g_actor, g_critic,
                fill if grad_logp is None else grad_logp, fill if grad_entropy is None else grad_entropy,
                fill if grad_values is None else grad_values, N, cfg["clip_low"], cfg["clip_high"], _dual(cfg),
                cfg["value_clip"], cfg["inv_norm"], cfg["entropy_coef"], cfg["kl_coef"], BLOCK=PPO_BLOCK, **flags)
        if grad_actor is None:  # backward from the critic's loss alone: stop here, the actor's graph gets nothing
            grad_logp = grad_entropy = None
        if grad_critic is None:  # ... and the other way round: no pass of zeros through the critic
            grad_values = None
        return grad_logp, grad_entropy, grad_values, None, None, None, None, None, None, None


def _ppo_triton(logp, old_logp, advantages, mask, *, clip_eps=0.2, clip_eps_high=None, values=None,
                old_values=None, returns=None, value_clip=0.2, entropy=None, entropy_coef=0.0, ref_logp=None,
                kl_coef=0.0, kl_estimator="k3", dual_clip=None, normalizer=None):
    """mask: bool. Every input is flattened to a contiguous [N]: the kernels index them all with one offset."""
    _check_dual_clip(dual_clip)
    given = dict(logp=logp, old_logp=old_logp, advantages=advantages, values=values, old_values=old_values,
                 returns=returns, entropy=entropy, ref_logp=ref_logp)
    for name, t in given.items():
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"ppo_loss: {name} has shape {tuple(t.shape)}, the mask's is {tuple(mask.shape)}")
    flat = lambda t: t.reshape(-1).contiguous() if t is not None else None  # noqa: E731
    high = clip_eps if clip_eps_high is None else clip_eps_high
    cfg = {"clip_low": 1.0 - clip_eps, "clip_high": 1.0 + high, "inv_norm": _inv_normalizer(mask, normalizer),
           "value_clip": float(value_clip) if value_clip is not None else float("inf"),
           "entropy_coef": float(entropy_coef) if entropy is not None else 0.0,
           "kl_coef": float(kl_coef) if ref_logp is not None else 0.0, "kl_estimator": kl_estimator,
           "dual_clip": dual_clip if logp is not None else None}
    actor, critic, stats = PPOLossFunction.apply(flat(logp), flat(entropy), flat(values), flat(old_logp),
                                                 flat(advantages), mask_bytes(mask.reshape(-1)), flat(ref_logp),
                                                 flat(old_values),
                                                 flat(returns), cfg)
    names = ["pg_loss", "clip_frac", "approx_kl"] if logp is not None else []
    if logp is not None and dual_clip is not None:
        names.append("dual_clip_frac")
    if logp is not None and entropy is not None:
        names.append("entropy")
    if logp is not None and ref_logp is not None and kl_coef:
        names.append("kl_loss")
    if values is not None:
        names += ["value_loss"] + (["value_clip_frac"] if value_clip is not None else [])
    out = {name: stats[STATS.index(name)].detach() for name in names}
    return (actor if logp is not None else None), (critic if values is not None else None), out


def ppo_loss(logp, old_logp, advantages, mask, impl: str = "auto", **kwargs):
    """Clipped PPO losses (see module doc): (actor loss, critic loss or None, stats). dual_clip (> 1, or None:
    off) bounds a negative-advantage token's loss by dual_clip * |A|. With impl "triton",
    one kernel launch computes both losses and every stat, and one computes every gradient. A token counts
    where mask != 0 (any dtype, converted here once for both paths). impl: "auto" | "torch" | "triton"."""
    mask = bool_mask(mask)
    if resolve_impl(impl, "ppo_loss", logp) == "torch":
        return ppo_loss_ref(logp, old_logp, advantages, mask, **kwargs)
    return _ppo_triton(logp, old_logp, advantages, mask, **kwargs)


def value_loss(values, old_values, returns, mask, impl: str = "auto", **kwargs):
    """The critic's clipped value loss alone (critic-only warm-up): (loss, stats). Mask as ppo_loss."""
    mask = bool_mask(mask)
    if resolve_impl(impl, "value_loss", values) == "torch":
        return value_loss_ref(values, old_values, returns, mask, **kwargs)
    _, critic, stats = _ppo_triton(None, None, None, mask, values=values, old_values=old_values, returns=returns,
                                   **kwargs)
    return critic, stats
