"""The coherent reward and KL shaping on padded response tokens ([B, T], mask a prefix of each row; a
token counts where mask != 0, whatever the mask's dtype: see ops/_triton.py).

    d_t      = clip(log pi_SFT(y_t) - log pi_PT(y_t), -token_clip, token_clip)
    R        = scale * sum_t d_t  (/ L with length_normalize)           one number per response
    R'       = clip(seq_scale * R + seq_shift, -seq_clip, seq_clip)     running whitening / no-EOS policy
    sequence granularity:  r_t = R' at the last token, 0 elsewhere
    token granularity:     r_t = seq_scale * scale * d_t (/ L), plus the rest of R' at the last token,
                           so that sum_t r_t = R' in both cases
    shaped_t = r_t - kl_coef * KL_t(pi_old || pi_ref)                   (KL in the reward)
"""

from __future__ import annotations

from typing import Literal

import torch

from ._triton import bool_mask
from .ppo import KLEstimator, kl_estimate

Granularity = Literal["sequence", "token"]


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last masked token (rows need at least one)."""
    return bool_mask(mask).long().sum(-1).clamp_min(1) - 1


def coherent_rewards_ref(sft_logp: torch.Tensor, pt_logp: torch.Tensor, mask: torch.Tensor, *,
                         granularity: Granularity = "sequence", scale: float = 1.0, token_clip: float | None = None,
                         length_normalize: bool = False, seq_scale: torch.Tensor | None = None,
                         seq_shift: torch.Tensor | None = None, seq_clip: float | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (token rewards [B, T], R' [B], d [B, T] the clipped per-token log-ratio)."""
    mask = bool_mask(mask)
    m = mask.to(torch.float32)
    d = (sft_logp.float() - pt_logp.float()) * m
    if token_clip is not None:
        d = d.clamp(-token_clip, token_clip)
    length = m.sum(-1).clamp_min(1.0)
    per_token = scale * d / (length.unsqueeze(-1) if length_normalize else 1.0)  # [B, T]
    raw = per_token.sum(-1)  # R: [B]
    a = seq_scale.float() if seq_scale is not None else torch.ones_like(raw)
    b = seq_shift.float() if seq_shift is not None else torch.zeros_like(raw)
    final = a * raw + b
    if seq_clip is not None:
        final = final.clamp(-seq_clip, seq_clip)
    last = last_index(mask).unsqueeze(-1)
    if granularity == "token":
        rewards = a.unsqueeze(-1) * per_token
        rest = final - rewards.sum(-1)  # shift and clipping land on the last token
    elif granularity == "sequence":
        rewards = torch.zeros_like(per_token)
        rest = final
    else:
        raise ValueError(f"unknown reward granularity {granularity!r}; use sequence or token")
    rewards = rewards.scatter_add(-1, last, rest.unsqueeze(-1)) * m
    return rewards, final, d


def sequence_rewards_ref(final: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One reward per response ([B]) on its last token: [B, T]."""
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=final.device)
    mask = bool_mask(mask)
    return rewards.scatter_(-1, last_index(mask).unsqueeze(-1), final.float().unsqueeze(-1)) * mask


def kl_shaped_rewards_ref(task_rewards: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                          mask: torch.Tensor, kl_coef: float, kl_estimator: KLEstimator = "k1"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(task reward - kl_coef * KL per token, KL per token), both [B, T] and 0 off-mask."""
    m = bool_mask(mask).to(torch.float32)
    kl = kl_estimate(old_logp.float(), ref_logp.float(), kl_estimator) * m
    return (task_rewards.float() - kl_coef * kl) * m, kl
