"""Generalised advantage estimation on padded response tokens.

Shapes: rewards, values, mask [B, T]; the mask marks each row's response tokens, a prefix of the
row (right padding). The state after a row's last response token is terminal (value 0).

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t                       (the critic's regression target)

With values = 0 and lam = 1, the returns are the discounted returns-to-go (REINFORCE/RLOO/GRPO).
"""

from __future__ import annotations

import torch


def gae_ref(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
            lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification: a reverse scan over T in fp32. Returns (advantages, returns), [B, T], 0 off-mask."""
    m = mask.to(torch.float32)
    r = rewards.float() * m
    v = values.float() * m
    advantages = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # A_{t+1}
    next_value = torch.zeros_like(r[:, 0])  # V_{t+1}, 0 past the end
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        advantages[:, t] = running
        next_value = v[:, t]
    return advantages, (advantages + v) * m


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95,
        impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) for padded [B, T] rewards/values/mask. impl: "auto" | "torch"."""
    if impl not in ("auto", "torch"):
        raise ValueError(f"gae: unknown impl {impl!r}")
    return gae_ref(rewards, values, mask, gamma, lam)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{k >= t} gamma^(k - t) r_k over each row's response tokens: [B, T]."""
    return gae(rewards, torch.zeros_like(rewards, dtype=torch.float32), mask, gamma, 1.0)[1]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (0 off-mask)."""
    m = mask.to(torch.float32)
    n = m.sum().clamp_min(1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    out = (x - mean) if shift_mean else x
    return out * torch.rsqrt(var + eps) * m
