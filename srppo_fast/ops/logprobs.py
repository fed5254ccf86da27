"""Token log-probabilities from logits: log_softmax(logits / temperature) gathered at the labels.

Shapes: logits [N, V] (any float dtype), labels [N] int64 -> log-probs [N] float32 (and entropy [N]).
Labels equal to `ignore_index` give 0.
"""

from __future__ import annotations

import torch


def token_logprobs_ref(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                       return_entropy: bool = False, ignore_index: int = -100):
    """The specification, in fp32: log p(label) and optionally the entropy of each row."""
    # logits: [N, V], labels: [N]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100, impl: str = "auto"):
    """Per-token log-probs (and entropy). impl: "auto" | "torch"."""
    if impl not in ("auto", "torch"):
        raise ValueError(f"token_logprobs: unknown impl {impl!r}")
    return token_logprobs_ref(logits, labels, temperature, return_entropy, ignore_index)
