"""`varlen_sdpa`: attention for packed rows, registered with transformers' AttentionInterface.

transformers handles a packed row (position_ids restarting, no attention mask) by building a
block-diagonal causal mask of N x N and running dense attention over the whole row: on a CPU that
is ~6x the cost of the same tokens padded. Here each sequence of the row (from `cu_seq_lens_q`)
is scattered into its own right-padded row of a [n, L] batch and attended with causal SDPA: a
query at position t < len sees keys 0..t only, so right padding can never leak into real tokens,
and no mask is materialised. Sequences are grouped into buckets of similar length (a new bucket
when a sequence is shorter than 0.6 x the bucket's longest), so little of that padding is computed.
The buckets are planned once per forward (on the host: one sync per forward on CUDA, where
flash_attention_2 is the better choice anyway). Calls without `cu_seq_lens_q` (generation) take
transformers' sdpa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "varlen_sdpa"
_registered = False


def padded_index(cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
    """[N] int64: row * max_len + offset of every packed token (cu_seqlens: [n+1])."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
    offsets = torch.arange(int(cu[-1]), device=cu.device) - torch.repeat_interleave(cu[:-1], lengths)
    return rows * max_len + offsets


class _Bucket:
    """Sequences of similar length, attended together in a [n_b, L_b] padded batch."""

    def __init__(self, starts: list[int], lengths: list[int], device: torch.device):
        self.n, self.max_len = len(lengths), max(lengths)
        # token positions in the packed row, sequence by sequence
        self.tokens = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]).to(device)
        rows = torch.repeat_interleave(torch.arange(self.n), torch.tensor(lengths))
        offsets = torch.cat([torch.arange(n) for n in lengths])
        self.slots = (rows * self.max_len + offsets).to(device)  # where each token sits in [n_b * L_b]


class _Plan:
    """Buckets of a packed row and the permutation that restores token order (built once per forward:
    every layer receives the same cu_seqlens tensor)."""

    def __init__(self, cu: torch.Tensor, ratio: float = 0.6):
        bounds = cu.tolist()
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        groups: list[list[int]] = []
        for i in order:  # longest first; a new bucket when a sequence is much shorter than the bucket's longest
            if not groups or lengths[i] < ratio * lengths[groups[-1][0]]:
                groups.append([])
            groups[-1].append(i)
        self.buckets = [_Bucket([bounds[i] for i in g], [lengths[i] for i in g], cu.device) for g in groups]
        perm = torch.cat([b.tokens for b in self.buckets])
        self.inverse = torch.empty_like(perm)
        self.inverse[perm] = torch.arange(len(perm), device=perm.device)


_last_plan: tuple[torch.Tensor | None, _Plan | None] = (None, None)


def _plan_for(cu: torch.Tensor) -> _Plan:
    global _last_plan
    if _last_plan[0] is not cu:
        _last_plan = (cu, _Plan(cu))
    return _last_plan[1]


def window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[L, L] bool (True: attend) of causal attention within a sliding window: query i sees keys j with
    i - window < j <= i (transformers' convention). None when the window covers every position."""
    if window is None or window >= length:
        return None
    i = torch.arange(length, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def _attend_bucket(bucket: _Bucket, q, k, v, scaling, dropout, gqa, window: int | None) -> torch.Tensor:
    """q/k/v: [N, h, D] packed -> [n_b tokens, H, D] for the bucket's tokens."""
    def pad(x: torch.Tensor) -> torch.Tensor:  # -> [n_b, h, L_b, D]
        out = x.new_zeros(bucket.n * bucket.max_len, x.shape[1], x.shape[2])
        out[bucket.slots] = x[bucket.tokens]
        return out.view(bucket.n, bucket.max_len, x.shape[1], x.shape[2]).transpose(1, 2)

    mask = window_mask(bucket.max_len, window, q.device)  # right padding is never a real query's key either way
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, is_causal=mask is None,
                                         scale=scaling, dropout_p=dropout, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(bucket.n * bucket.max_len, q.shape[1], -1)[bucket.slots]


def varlen_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query: [1, H, N, D], key/value: [1, Hkv, N, D] -> ([1, N, H, D], None)."""
    cu = kwargs.get("cu_seq_lens_q")
    window = kwargs.get("sliding_window")  # Mistral, Qwen2 (per layer): keys further back are not seen
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if attention_mask is None and query.shape[2] == key.shape[2]:  # one sequence, no cache
            mask = window_mask(query.shape[2], window, query.device)
            attention_mask = mask[None, None] if mask is not None else None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("varlen_sdpa expects one packed row (batch size 1)")
    plan = _plan_for(cu)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, h, D]
    gqa = key.shape[1] != query.shape[1]
    p = dropout if module.training else 0.0
    out = torch.cat([_attend_bucket(b, q, k, v, scaling, p, gqa, window) for b in plan.buckets])[plan.inverse]
    return out.unsqueeze(0), None


def register() -> None:
    """Make attn_implementation="varlen_sdpa" available to transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_sdpa_attention)
    _registered = True


def packed_kwargs(cu_seqlens: torch.Tensor, max_len: int) -> dict:
    """Keyword arguments a packed forward passes to the model: varlen_sdpa and flash_attention_2 read
    them; sdpa/eager ignore them and rebuild the boundaries from position_ids."""
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": max_len,
            "max_length_k": max_len}
