"""`varlen_sdpa`: attention for packed rows, registered with transformers' AttentionInterface.

transformers handles a packed row (position_ids restarting, no attention mask) by building a
block-diagonal causal mask of N x N and running dense attention over the whole row: on a CPU that
is ~6x the cost of the same tokens padded. Here each sequence of the row (from `cu_seq_lens_q`)
is scattered into its own right-padded row of a [n, L] batch and attended with causal SDPA: a
query at position t < len sees keys 0..t only, so right padding can never leak into real tokens,
and no mask is materialised. Calls without `cu_seq_lens_q` (generation) take transformers' sdpa.
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


def varlen_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query: [1, H, N, D], key/value: [1, Hkv, N, D] -> ([1, N, H, D], None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("varlen_sdpa expects one packed row (batch size 1)")
    n = cu.numel() - 1
    max_len = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
    index = padded_index(cu, max_len)

    def pad(x: torch.Tensor) -> torch.Tensor:  # [1, h, N, D] -> [n, h, L, D]
        h, d = x.shape[1], x.shape[3]
        out = x.new_zeros(n * max_len, h, d)
        out[index] = x[0].transpose(0, 1)
        return out.view(n, max_len, h, d).transpose(1, 2)

    heads = query.shape[1]
    out = F.scaled_dot_product_attention(
        pad(query), pad(key), pad(value), is_causal=True, scale=scaling,
        dropout_p=dropout if module.training else 0.0, enable_gqa=key.shape[1] != heads)
    out = out.transpose(1, 2).reshape(n * max_len, heads, -1)[index]  # [N, H, D]
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
