"""Advantage estimators over a rollout buffer, and running moments for reward whitening.

Shapes: rewards, values, mask [B, T] (mask a prefix of each row); prompt_index [B] groups the
n samples of each prompt. Returns (advantages, returns), [B, T], 0 off-mask.

    gae        A = GAE(gamma, lambda) with the critic's values; returns = A + V (the critic's target)
    reinforce  A_t = G_t - mean over the buffer of G_0      (G: returns-to-go)
    rloo       A_t = G_t - mean of G_0 over the *other* samples of the same prompt
    grpo       A_t = (G_t - mean_group G_0) / (std_group G_0 + eps)
"""

from __future__ import annotations

import numpy as np
import torch

from .ops import gae, masked_whiten, returns_to_go


def _group_stats(totals: torch.Tensor, prompt_index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: (sum, count, unbiased std) of `totals` over its prompt's group."""
    groups = torch.as_tensor(prompt_index, dtype=torch.long)
    n_groups = int(groups.max()) + 1
    sums = torch.zeros(n_groups).index_add_(0, groups, totals)
    counts = torch.zeros(n_groups).index_add_(0, groups, torch.ones_like(totals))
    means = sums / counts
    sq = torch.zeros(n_groups).index_add_(0, groups, (totals - means[groups]) ** 2)
    std = torch.sqrt(sq / (counts - 1).clamp_min(1.0))
    return sums[groups], counts[groups], std[groups]


def baseline_advantages(estimator: str, returns: torch.Tensor, mask: torch.Tensor,
                        prompt_index: np.ndarray | None = None, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE / RLOO / GRPO advantages from returns-to-go G [B, T] (see the module doc)."""
    totals = returns[:, 0]  # G_0: the whole response's return
    if estimator == "reinforce":
        baseline, scale = totals.mean().expand_as(totals), torch.ones_like(totals)
    else:
        sums, counts, std = _group_stats(totals, prompt_index)
        if estimator == "rloo":
            baseline, scale = (sums - totals) / (counts - 1).clamp_min(1.0), torch.ones_like(totals)
        elif estimator == "grpo":
            baseline, scale = sums / counts, 1.0 / (std + eps)
        else:
            raise ValueError(f"unknown advantage estimator {estimator!r}")
    return (returns - baseline.unsqueeze(-1)) * scale.unsqueeze(-1) * mask.to(torch.float32)


def compute_advantages(estimator: str, rewards: torch.Tensor, mask: torch.Tensor, *, values: torch.Tensor | None = None,
                       prompt_index: np.ndarray | None = None, gamma: float = 1.0, lam: float = 0.95,
                       whiten: bool = True, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    if estimator == "gae":
        advantages, returns = gae(rewards, values, mask, gamma, lam)
    else:
        returns = returns_to_go(rewards, mask, gamma)  # G_t
        advantages = baseline_advantages(estimator, returns, mask, prompt_index, eps)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


class RunningMoments:
    """Mean and variance of everything seen so far (parallel Welford merge); state survives a resume."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.double().flatten()
        n = x.numel()
        if n == 0:
            return
        mean, m2 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        delta = mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / max(self.count - 1, 1))) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens."""
    m = mask.bool()
    r, v = returns[m].double(), values[m].double()
    var = r.var(unbiased=False)
    return float(1.0 - (r - v).var(unbiased=False) / var) if var > 0 else float("nan")
