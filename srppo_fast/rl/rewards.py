"""Step 4: a rollout buffer's rewards and advantages, one path whatever the reward, and the sampler's
importance correction."""

from __future__ import annotations

import logging

import torch

from ..advantages import RunningMoments, baseline_advantages, explained_variance, resolve_whiten
from ..config import RLStageConfig
from ..experience import (
    Experience,
)
from ..ops import (
    coherent_gae,
    kl_estimate,
    masked_whiten,
)

log = logging.getLogger("srppo_fast")


def sequence_adjustment(rl: RLStageConfig, raw: torch.Tensor, ended: torch.Tensor,
                        moments: RunningMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_scale, seq_shift) turning the raw sequence reward R into R' = scale * R + shift: running
    whitening, and the no-EOS penalty (scale 0, shift = penalty)."""
    scale, shift = torch.ones_like(raw), torch.zeros_like(raw)
    if rl.reward.whiten:
        moments.update(raw)
        scale, shift = scale / moments.std, shift - moments.mean / moments.std
    if rl.reward.no_eos == "penalty":
        scale = torch.where(ended, scale, torch.zeros_like(scale))
        shift = torch.where(ended, shift, torch.full_like(shift, rl.reward.no_eos_penalty))
    return scale, shift


def rewards_and_advantages(rl: RLStageConfig, exp: Experience, scores: dict, moments: RunningMoments) -> dict:
    """Fill exp.rewards / advantages / returns; return the reward statistics of the buffer. Whatever the reward
    (the coherent reward from pi_SFT and pi_PT, or a reward model's score of each response), one path: per-token
    rewards (the coherent reward's log-ratio, or the score on the terminal token), then the same adjustments (no-EOS
    policy, running whitening, clipping), KL shaping and GAE or returns (one op, ops.coherent_gae), then the same
    baseline and whitening."""
    mask, r, a = exp.mask, rl.reward, rl.advantage
    kl_k1 = kl_estimate(exp.old_logp, exp.ref_logp, "k1") * mask
    kl_coef = rl.kl.coef if rl.kl.placement == "reward" else 0.0
    kl = kl_estimate(exp.old_logp, exp.ref_logp, rl.kl.estimator) * mask
    if "model" in scores:  # one number per response: no per-token log-ratio, the score is the sequence reward
        raw = scores["model"] * r.scale
        scale, shift = sequence_adjustment(rl, raw, exp.ended, moments)
        zero = torch.zeros_like(exp.old_logp)
        sft, pt, log_ratio = zero, zero, None
        # the op's terminal reward is clip(seq_scale * R + seq_shift) of its own R (0 here): the score enters as
        # the shift, adjusted as the coherent reward's R is
        shape = dict(granularity="sequence", scale=1.0, token_clip=None, length_normalize=False,
                     seq_scale=torch.zeros_like(raw), seq_shift=scale * raw + shift)
    else:
        d = (scores["sft"] - scores["pt"]) * mask
        if r.token_clip is not None:
            d = d.clamp(-r.token_clip, r.token_clip)
        length = mask.sum(-1).clamp_min(1).float()
        raw = r.scale * d.sum(-1) / (length if r.length_normalize else 1.0)
        scale, shift = sequence_adjustment(rl, raw, exp.ended, moments)
        sft, pt, log_ratio = scores["sft"], scores["pt"], d
        shape = dict(granularity=r.granularity, scale=r.scale, token_clip=r.token_clip,
                     length_normalize=r.length_normalize, seq_scale=scale, seq_shift=shift)
    exp.rewards, exp.advantages, exp.returns, final, _ = coherent_gae(
        exp.old_logp, exp.ref_logp, sft, pt, exp.values if a.estimator == "gae" else None, mask, kl_coef=kl_coef,
        kl_estimator=rl.kl.estimator, seq_clip=r.clip, gamma=a.gamma, lam=a.lam, **shape)
    if a.estimator != "gae":
        exp.advantages = baseline_advantages(a.estimator, exp.returns, mask, exp.prompt_index)
    if resolve_whiten(a.estimator, a.whiten):  # null: gae and reinforce only (advantages.py)
        exp.advantages = masked_whiten(exp.advantages, mask)
    stats = {"reward/task": final.mean(), "reward/total": exp.rewards.sum(-1).mean(),
             "reward/kl": -kl_coef * kl.sum(-1).mean(), "kl": kl_k1.sum(-1).mean(),
             "kl/estimator_mean": kl.sum() / mask.sum()}
    stats["reward/model" if log_ratio is None else "reward/coherent"] = raw.mean()
    exp.stats.update(reward=raw, log_ratio=log_ratio, kl=kl_k1.sum(-1))  # per response, for the samples table
    if log_ratio is not None:  # per-token log-ratio: hacking shows here first
        tokens = log_ratio[mask]
        q = torch.quantile(tokens, torch.tensor([0.05, 0.5, 0.95]))
        stats.update({"log_ratio/mean": tokens.mean(), "log_ratio/p05": q[0], "log_ratio/p50": q[1],
                      "log_ratio/p95": q[2]})
    if exp.values is not None:
        stats["explained_variance"] = explained_variance(exp.values, exp.returns, mask)
    return {k: float(v) for k, v in stats.items()}


def sampler_correction(rl: RLStageConfig, exp: Experience) -> dict:
    """The sampler/trainer mismatch of the buffer, per response token: log pi_old - log pi_sampler, pi_old the
    trainer's recomputation (the PPO ratio's denominator) and pi_sampler what drew the token (vLLM's processed
    log-prob: tempered, and renormalised over the nucleus when top_p < 1; async, from weights up to
    max_staleness updates older). With rollout.tis_cap, each token's advantage is weighted by
    min(pi_old / pi_sampler, cap) (truncated importance sampling): the policy-gradient term then estimates the
    gradient under pi_old from samples of pi_sampler, with bounded variance."""
    if exp.sampler_logp is None:
        return {}
    delta = (exp.old_logp - exp.sampler_logp)[exp.mask]
    ratio = delta.exp()
    stats = {"rollout/logprob_diff_mean": float(delta.abs().mean()),
             "rollout/logprob_diff_max": float(delta.abs().max()), "rollout/is_ratio_mean": float(ratio.mean())}
    cap = rl.rollout.tis_cap
    if cap is not None:
        weights = torch.zeros_like(exp.old_logp)
        weights[exp.mask] = ratio.clamp(max=cap)
        exp.advantages = exp.advantages * weights
        stats.update({"rollout/tis_weight_mean": float(ratio.clamp(max=cap).mean()),
                      "rollout/tis_capped_frac": float((ratio > cap).float().mean())})
    return stats
