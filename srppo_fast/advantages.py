"""Advantage estimators over a rollout buffer, and running moments for reward whitening.

Shapes: rewards, values, mask [B, T] (mask a prefix of each row; a token counts where mask != 0);
prompt_index [B] groups the n samples of each prompt. Returns (advantages, returns), [B, T], 0 off-mask.

    gae        A = GAE(gamma, lambda) with the critic's values; returns = A + V (the critic's target)
    reinforce  A_t = G_t - mean over the buffer of G_0      (G: returns-to-go)
    rloo       A_t = G_t - mean of G_0 over the *other* samples of the same prompt
    grpo       A_t = (G_t - mean_group G_0) / (std_group G_0 + eps)     (unbiased std), and A = 0 for a
               group with no spread to learn from: one sample, or std_group <= tie_tol * max(1, max_group |G_0|)

Whitening over the buffer (mean 0, std 1 over the masked tokens) follows `advantage.whiten`; null, the
default, means true for gae and reinforce and false for rloo and grpo (`resolve_whiten`, the one place
that says so). The group baselines of rloo and grpo already centre each prompt's samples (grpo also scales
them), and whitening afterwards would shift a tied group's zero advantage to -mean / std; none of TRL,
verl and OpenRLHF whitens rloo or grpo advantages by default. An explicit true still whitens them.

Why the GRPO tie rule: dividing by std + eps turns rounding differences into full-size advantages. The
same response scored in two micro-batches gives totals equal up to ~1e-5; their std is ~1e-5 and
(G - mean) / (std + 1e-6) is of order 1 (up to 1.5 in a group of 4), as large as a genuine spread like
[1, 2, 3, 4] gets (+-0.39, +-1.16). With token rewards G_t - mean G_0 is not even small for t > 0, so a
tied group's scale is set to 0, not only its numerator.
"""

from __future__ import annotations

import numpy as np
import torch

from .ops import gae, masked_whiten, returns_to_go
from .ops._triton import bool_mask

TIE_TOL = 1e-4  # GRPO: rounding, not preference, below this std relative to the totals' size (absolute below 1)


def _group_stats(totals: torch.Tensor, prompt_index) -> tuple[torch.Tensor, ...]:
    """Per sample, over its prompt's group, in fp64: (sum, count, unbiased std, largest |total|) of `totals` [B]."""
    if prompt_index is None:
        raise ValueError("rloo and grpo advantages need prompt_index: which prompt each sample answers")
    t = totals.detach().double()
    groups = torch.as_tensor(np.asarray(prompt_index), dtype=torch.long, device=t.device)
    if groups.shape != t.shape:
        raise ValueError(f"prompt_index has {tuple(groups.shape)} entries for {t.numel()} samples")
    n_groups = int(groups.max()) + 1
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=t.device)
    sums = zeros.index_add(0, groups, t)
    counts = zeros.index_add(0, groups, torch.ones_like(t))
    means = sums / counts.clamp_min(1.0)
    sq = zeros.index_add(0, groups, (t - means[groups]) ** 2)
    std = torch.sqrt(sq / (counts - 1).clamp_min(1.0))
    size = zeros.scatter_reduce(0, groups, t.abs(), reduce="amax")
    return tuple(x[groups] for x in (sums, counts, std, size))


def baseline_advantages(estimator: str, returns: torch.Tensor, mask: torch.Tensor,
                        prompt_index: np.ndarray | None = None, eps: float = 1e-6,
                        tie_tol: float = TIE_TOL) -> torch.Tensor:
    """REINFORCE / RLOO / GRPO advantages from returns-to-go G [B, T] (see the module doc).

    eps: GRPO's std guard. tie_tol: a GRPO group whose unbiased std of G_0 is <= tie_tol * max(1, the
    group's largest |G_0|) counts as tied and gets A = 0 at every token, as does a group of one sample.
    The bound is relative for totals above 1 in size (rounding scales with them: 1e-4 is ~840 fp32 ulps,
    room for sums of many token log-probs taken in different batches) and absolute below. 0 keeps only
    exact ties and single samples."""
    if estimator not in ("reinforce", "rloo", "grpo"):
        raise ValueError(f"unknown advantage estimator {estimator!r}; use gae, reinforce, rloo or grpo")
    totals = returns[:, 0]  # G_0: the whole response's return
    if estimator == "reinforce":
        baseline, scale = totals.mean().expand_as(totals), torch.ones_like(totals)
    else:
        sums, counts, std, size = _group_stats(totals, prompt_index)
        if estimator == "rloo":
            baseline, scale = (sums - totals) / (counts - 1).clamp_min(1.0), torch.ones_like(sums)
        else:  # grpo
            tied = (counts < 2) | (std <= tie_tol * size.clamp_min(1.0))
            baseline = sums / counts
            scale = torch.where(tied, torch.zeros_like(std), 1.0 / (std + eps))
    adv = (returns - baseline.unsqueeze(-1)) * scale.unsqueeze(-1) * bool_mask(mask)
    return adv.to(returns.dtype)


def resolve_whiten(estimator: str, whiten: bool | None) -> bool:
    """Whether `estimator`'s advantages are whitened over the buffer: `whiten` when given (advantage.whiten),
    else (null, the default) true for gae and reinforce, false for rloo and grpo (module doc)."""
    if whiten is not None:
        return bool(whiten)
    if estimator not in ("gae", "reinforce", "rloo", "grpo"):
        raise ValueError(f"unknown advantage estimator {estimator!r}; use gae, reinforce, rloo or grpo")
    return estimator in ("gae", "reinforce")


def compute_advantages(estimator: str, rewards: torch.Tensor, mask: torch.Tensor, *, values: torch.Tensor | None = None,
                       prompt_index: np.ndarray | None = None, gamma: float = 1.0, lam: float = 0.95,
                       whiten: bool | None = None, eps: float = 1e-6, tie_tol: float = TIE_TOL
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] of `estimator` (see the module doc), whitened over the masked tokens
    when resolve_whiten(estimator, whiten) (None: the estimator's default). eps and tie_tol: GRPO's, as
    baseline_advantages."""
    if estimator == "gae":
        advantages, returns = gae(rewards, values, mask, gamma, lam)
    else:
        returns = returns_to_go(rewards, mask, gamma)  # G_t
        advantages = baseline_advantages(estimator, returns, mask, prompt_index, eps, tie_tol)
    if resolve_whiten(estimator, whiten):
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
