"""A rollout buffer as tensors: prompt + response sequences, scored on packed micro-batches.

Per-token quantities of the responses are padded to [B, T] (B responses, T the longest response;
`mask` marks response tokens, a prefix of each row). In a packed micro-batch, the outputs at the
positions whose label is a response token (logits that predict it, or the critic's value of the
state before it) come out in sequence order, so `x[ids][mask[ids]]` lines experience tensors up with
packed outputs, and `unflatten` puts packed outputs back into [B, T].
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from . import dist
from .attention import packed_kwargs
from .batching import PackedBatch, rank_microbatches
from .ops import linear_token_logprobs, token_logprobs
from .tokens import TokenizedSet


def build_sequences(prompts: list[list[int]], responses: list[list[int]]) -> TokenizedSet:
    """Prompt + response token sequences with the response tokens as targets."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for p, r in zip(prompts, responses) for t in (*p, *r)), dtype=np.int32,
                         count=int(offsets[-1]))
    targets = np.concatenate([np.r_[np.zeros(len(p), bool), np.ones(len(r), bool)]
                              for p, r in zip(prompts, responses)])
    return TokenizedSet(tokens, targets, offsets)


def response_mask(responses: list[list[int]]) -> torch.Tensor:
    """[B, T] bool: True on each row's response tokens."""
    lengths = torch.tensor([len(r) for r in responses])
    return torch.arange(int(lengths.max())).unsqueeze(0) < lengths.unsqueeze(1)


def flat(x: torch.Tensor, mask: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    """The response-token entries of rows `ids`, in packed order: [n tokens]."""
    index = torch.as_tensor(ids, dtype=torch.long)
    return x[index][mask[index]]


def unflatten(values: torch.Tensor, mask: torch.Tensor, ids: np.ndarray, out: torch.Tensor) -> None:
    """Write packed response-token values of rows `ids` into `out` ([B, T]) in place."""
    index = torch.as_tensor(ids, dtype=torch.long)
    rows = out[index]
    rows[mask[index]] = values.to(out.dtype)
    out[index] = rows


def packed_forward(module, batch: PackedBatch):
    """`module` (a model or its body) on a packed micro-batch: sequences attend only within themselves."""
    return module(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                  **packed_kwargs(batch.cu_seqlens, batch.max_len))


def forward_logits(model, batch: PackedBatch) -> torch.Tensor:
    """[N, V] logits of a packed micro-batch."""
    return packed_forward(model, batch).logits[0]


def lm_head(model) -> torch.nn.Module | None:
    """The output projection when logits are exactly hidden @ W.T (no bias, scale or soft-capping)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None or not hasattr(head, "weight"):
        return None
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(model.config, attr, None) not in (None, 1, 1.0):
            return None
    return head


@contextlib.contextmanager
def head_computes_logprobs(head: torch.nn.Module, temperature: float, return_entropy: bool):
    """Make `head(hidden, labels)` run the fused log-prob op on the head's weight, inside the head module's own
    call. Under ZeRO-3 the weight is a shard outside that call: DeepSpeed's module hooks gather it before the
    forward and again before the backward (the fused op recomputes the logits there), as for the plain head."""
    def forward(self, hidden, labels):
        return linear_token_logprobs(hidden, self.weight, labels, temperature, return_entropy)

    head.forward = types.MethodType(forward, head)  # an instance attribute: shadows the class's forward
    try:
        yield head
    finally:
        del head.forward


def packed_label_logprobs(model, batch: PackedBatch, temperature: float = 1.0, return_entropy: bool = False):
    """Log-probs (and entropies) of the micro-batch's labels (positions whose label is not -100), in packed
    order: [n]. Where the model allows, the body's hidden states at those positions go through the fused
    lm_head + log-probs op (ops.linear_token_logprobs): no [N, V] logits, none at prompt positions; a ZeRO-3
    sharded head too (it runs inside the head's call, where DeepSpeed gathers the weight)."""
    keep = batch.labels[0] != -100
    labels = batch.labels[0][keep]
    head = lm_head(model)
    if head is None:
        return token_logprobs(forward_logits(model, batch)[keep], labels, temperature, return_entropy)
    hidden = packed_forward(model.base_model, batch).last_hidden_state[0]
    if hasattr(head.weight, "ds_id"):  # a ZeRO-3 shard, whole only inside the head's own call
        with head_computes_logprobs(head, temperature, return_entropy):
            return head(hidden[keep], labels)
    return linear_token_logprobs(hidden[keep], head.weight, labels, temperature, return_entropy)


def probe_logprobs(model, tokens: list[int], device: torch.device, autocast) -> torch.Tensor:
    """`model`'s log-prob of each token of `tokens` after the first, given its prefix: [len - 1] (a sampler's probe)."""
    seqs, mask = build_sequences([tokens[:1]], [tokens[1:]]), response_mask([tokens[1:]])
    return score_tokens(lambda b: packed_label_logprobs(model, b), seqs, mask, len(tokens), device, autocast)[0]


def packed_token_logprobs(model, batch: PackedBatch) -> torch.Tensor:
    """Log-prob of each packed token's label ([N] fp32; 0 where the label is -100)."""
    out = torch.zeros(batch.num_tokens, dtype=torch.float32, device=batch.input_ids.device)
    out[batch.labels[0] != -100] = packed_label_logprobs(model, batch)
    return out


def packed_response_values(critic, batch: PackedBatch) -> torch.Tensor:
    """Critic values of the states before each response token, in packed order: [n]."""
    return packed_forward(critic, batch).logits[0, :, 0][batch.labels[0] != -100].float()


@torch.no_grad()
def score_tokens(fn: Callable[[PackedBatch], torch.Tensor], data: TokenizedSet, mask: torch.Tensor, budget: int,
                 device: torch.device, autocast) -> torch.Tensor:
    """Run `fn` (micro-batch -> per-response-token values) over every sequence: [B, T] fp32, 0 off-mask. Each
    rank runs its balanced share (a dummy micro-batch where it has none left: ZeRO-3 forwards are collective);
    the shares are summed over the ranks, so every rank gets the whole buffer."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    share = rank_microbatches(data, np.arange(len(data)), budget, dist.rank(), dist.world_size())
    for batch, real in share.on_device(device):
        with autocast():
            values = fn(batch)
        if real:
            unflatten(values.float().cpu(), mask, batch.seq_ids, out)
    return dist.all_reduce_tensor_(out)


@dataclass
class Experience:
    """One rollout buffer. [B, T] tensors are on the CPU; `sequences` holds prompt + response tokens."""

    sequences: TokenizedSet
    mask: torch.Tensor  # [B, T] bool
    prompt_index: np.ndarray  # [B] which prompt of the step each response answers
    ended: torch.Tensor  # [B] bool: produced EOS
    old_logp: torch.Tensor  # [B, T] actor at sampling time
    ref_logp: torch.Tensor  # [B, T] KL reference (pi_SFT by default)
    values: torch.Tensor | None = None  # [B, T] critic (gae)
    sampler_logp: torch.Tensor | None = None  # [B, T] the sampler's own log-probs (vllm)
    rewards: torch.Tensor | None = None  # [B, T] shaped per-token rewards
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


def packed_sequence_scores(reward_model, batch: PackedBatch) -> torch.Tensor:
    """A sequence-classification reward model's score of each sequence of the micro-batch: [n], read at
    each sequence's last token (the packed row has no padding to locate it by)."""
    body = getattr(reward_model, reward_model.base_model_prefix)
    hidden = packed_forward(body, batch).last_hidden_state[0]  # [N, H]
    last = batch.cu_seqlens[1:].long() - 1
    return reward_model.score(hidden[last])[:, 0].float()
