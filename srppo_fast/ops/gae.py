"""Generalised advantage estimation, and the coherent reward + KL shaping + GAE fused in one launch.

Shapes: padded rewards, values, mask [B, T] (the mask marks each row's response tokens, a prefix of
the row), or packed [N] with cu_seqlens [n+1]. The state after a row's last token is terminal. The mask
is boolean: a float or integer mask means mask != 0 (ops/_triton.py), in both implementations.

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t                       (the critic's regression target)

With values = 0 and lam = 1, the returns are the discounted returns-to-go (REINFORCE/RLOO/GRPO).

Kernel: one program per sequence. The recurrence A_t = d_t + c_t A_{t+1} (c_t = gamma lam m_t,
d_t = delta_t m_t) composes as affine maps, so each block of BLOCK_T steps is a reverse associative
scan, and the blocks are chained from the end with a carry. `coherent_gae` runs the reward shaping
of ops/rewards.py first, in the same program: a pass over the row for the summed log-ratio, then the
scan with each token's shaped reward computed on the fly.
"""

from __future__ import annotations

import torch

from ._triton import bool_mask, mask_bytes, next_power_of_2, resolve_impl, tl, triton
from .ppo import kl_estimate
from .rewards import coherent_rewards_ref, kl_shaped_rewards_ref

KL_CODES = {"k1": 1, "k2": 2, "k3": 3}

# ------------------------------------------------------------------------------------------------
# references


def gae_ref(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
            lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification: a reverse scan over T in fp32. Returns (advantages, returns), [B, T], 0 off-mask.
    A token counts where mask != 0."""
    m = bool_mask(mask).to(torch.float32)
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


def coherent_gae_ref(old_logp, ref_logp, sft_logp, pt_logp, values, mask, *, kl_coef: float = 0.0,
                     kl_estimator: str = "k1", granularity: str = "sequence", scale: float = 1.0,
                     token_clip: float | None = None, length_normalize: bool = False, seq_scale=None, seq_shift=None,
                     seq_clip: float | None = None, gamma: float = 1.0, lam: float = 0.95):
    """The fused op's specification: coherent reward, KL shaping, GAE (values None: returns-to-go).
    Returns (shaped rewards, advantages, returns) [B, T] and (final R', raw R) [B]. A token counts where mask != 0."""
    mask = bool_mask(mask)
    task, final, _ = coherent_rewards_ref(sft_logp, pt_logp, mask, granularity=granularity, scale=scale,
                                          token_clip=token_clip, length_normalize=length_normalize,
                                          seq_scale=seq_scale, seq_shift=seq_shift, seq_clip=seq_clip)
    m = mask.to(torch.float32)
    d = (sft_logp.float() - pt_logp.float()) * m
    if token_clip is not None:
        d = d.clamp(-token_clip, token_clip)
    raw = scale * d.sum(-1) / (m.sum(-1).clamp_min(1.0) if length_normalize else 1.0)
    rewards, _ = kl_shaped_rewards_ref(task, old_logp, ref_logp, mask, kl_coef, kl_estimator)
    if values is None:
        advantages, returns = gae_ref(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    else:
        advantages, returns = gae_ref(rewards, values, mask, gamma, lam)
    return rewards, advantages, returns, final, raw


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _compose(c_acc, d_acc, c_new, d_new):
    """Reverse-scan combine of x -> d + c x maps: the accumulation from the right, then the next
    element to its left (f_new o f_acc)."""
    return c_new * c_acc, d_new + c_new * d_acc


@triton.jit
def _row_span(cu_ptr, row, stride_row, T, PACKED: tl.constexpr):
    if PACKED:
        start = tl.load(cu_ptr + row).to(tl.int64)
        length = tl.load(cu_ptr + row + 1).to(tl.int64) - start
    else:
        start = row * stride_row
        length = T
    return start, length


@triton.jit
def _load_mask(mask_ptr, idx, ok, HAS_MASK: tl.constexpr):
    """1.0 where the token counts (mask != 0 inside the row), else 0.0."""
    if HAS_MASK:
        return (tl.load(mask_ptr + idx, mask=ok, other=0) != 0).to(tl.float32)
    return ok.to(tl.float32)


@triton.jit
def _gae_block(r, m, values_ptr, mask_ptr, start, offs, ok, length, lanes, carry, gamma, lam,
               HAS_VALUES: tl.constexpr, HAS_MASK: tl.constexpr):
    """One block of the reverse scan: rewards r at positions offs (masked by m) -> advantages, returns and
    the carry for the block before (the advantage at its first position). Without values V = 0."""
    v = tl.zeros(r.shape, tl.float32)
    v_next = tl.zeros(r.shape, tl.float32)
    if HAS_VALUES:
        v = tl.load(values_ptr + start + offs, mask=ok, other=0.0).to(tl.float32) * m
        nxt = offs + 1
        ok_next = (nxt >= 0) & (nxt < length)
        m_next = _load_mask(mask_ptr, start + nxt, ok_next, HAS_MASK)
        v_next = tl.load(values_ptr + start + nxt, mask=ok_next, other=0.0).to(tl.float32) * m_next
    c = gamma * lam * m
    d = (r + gamma * v_next - v) * m
    c_acc, d_acc = tl.associative_scan((c, d), 0, _compose, reverse=True)
    adv = d_acc + c_acc * carry
    return adv, (adv + v) * m, tl.sum(tl.where(lanes == 0, adv, 0.0), 0)


@triton.jit
def _gae_kernel(
    # data ptrs
    rewards_ptr, values_ptr, mask_ptr, cu_ptr, adv_ptr, ret_ptr,
    # strides and shapes
    stride_row, T,
    # scalars
    gamma, lam,
    # meta
    BLOCK_T: tl.constexpr, PACKED: tl.constexpr, HAS_MASK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start, length = _row_span(cu_ptr, row, stride_row, T, PACKED)
    lanes = tl.arange(0, BLOCK_T)
    carry = tl.sum(tl.zeros([BLOCK_T], tl.float32), 0)  # A of the step after the block (fp32: loop-carried)
    for k in range(0, length, BLOCK_T):
        offs = length - k - BLOCK_T + lanes  # the block ending k steps from the end
        ok = offs >= 0
        m = _load_mask(mask_ptr, start + offs, ok, HAS_MASK)
        r = tl.load(rewards_ptr + start + offs, mask=ok, other=0.0).to(tl.float32) * m
        a, ret, carry = _gae_block(r, m, values_ptr, mask_ptr, start, offs, ok, length, lanes, carry, gamma, lam,
                                   True, HAS_MASK)
        tl.store(adv_ptr + start + offs, a, mask=ok)
        tl.store(ret_ptr + start + offs, ret, mask=ok)


@triton.jit
def _kl(x, CODE: tl.constexpr):
    """KL estimators of log ratio x = logp - ref_logp: k1 x, k2 x^2 / 2, k3 exp(-x) - 1 + x."""
    if CODE == 1:
        return x
    elif CODE == 2:
        return 0.5 * x * x
    else:
        return tl.exp(-x) - 1.0 + x


@triton.jit
def _coherent_gae_kernel(
    # data ptrs: inputs
    old_ptr, ref_ptr, sft_ptr, pt_ptr, values_ptr, mask_ptr, cu_ptr, seq_scale_ptr, seq_shift_ptr,
    # data ptrs: outputs
    rewards_ptr, adv_ptr, ret_ptr, final_ptr, raw_ptr,
    # strides and shapes
    stride_row, T,
    # scalars
    kl_coef, scale, token_clip, seq_clip, gamma, lam,
    # meta
    BLOCK_T: tl.constexpr, PACKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_VALUES: tl.constexpr,
    HAS_SEQ_AFFINE: tl.constexpr, TOKEN_LEVEL: tl.constexpr, LENGTH_NORMALIZE: tl.constexpr, KL_CODE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start, length = _row_span(cu_ptr, row, stride_row, T, PACKED)
    lanes = tl.arange(0, BLOCK_T)
    # pass 1: the summed (clipped) log-ratio and the response length
    total = tl.zeros([BLOCK_T], tl.float32)
    count = tl.zeros([BLOCK_T], tl.float32)
    for k in range(0, length, BLOCK_T):
        offs = k + lanes
        ok = offs < length
        m = _load_mask(mask_ptr, start + offs, ok, HAS_MASK)
        dlt = tl.load(sft_ptr + start + offs, mask=ok, other=0.0).to(tl.float32) - \
            tl.load(pt_ptr + start + offs, mask=ok, other=0.0).to(tl.float32)
        total += tl.minimum(tl.maximum(dlt, -token_clip), token_clip) * m
        count += m
    n_tokens = tl.sum(count, 0)
    per_token = scale
    if LENGTH_NORMALIZE:
        per_token = scale / tl.maximum(n_tokens, 1.0)
    raw = per_token * tl.sum(total, 0)
    a = 1.0
    b = 0.0
    if HAS_SEQ_AFFINE:
        a = tl.load(seq_scale_ptr + row).to(tl.float32)
        b = tl.load(seq_shift_ptr + row).to(tl.float32)
    final = tl.minimum(tl.maximum(a * raw + b, -seq_clip), seq_clip)
    tl.store(final_ptr + row, final)
    tl.store(raw_ptr + row, raw)
    last = tl.maximum(n_tokens, 1.0) - 1.0  # the terminal token (masks are prefixes)
    at_last = final
    if TOKEN_LEVEL:
        at_last = final - a * raw
    lam_eff = lam
    if not HAS_VALUES:
        lam_eff = 1.0
    # pass 2: shaped rewards on the fly, reverse scan
    carry = tl.sum(tl.zeros([BLOCK_T], tl.float32), 0)
    for k in range(0, length, BLOCK_T):
        offs = length - k - BLOCK_T + lanes
        ok = offs >= 0
        m = _load_mask(mask_ptr, start + offs, ok, HAS_MASK)
        r = tl.where(offs.to(tl.float32) == last, at_last, 0.0)
        if TOKEN_LEVEL:
            dlt = tl.load(sft_ptr + start + offs, mask=ok, other=0.0).to(tl.float32) - \
                tl.load(pt_ptr + start + offs, mask=ok, other=0.0).to(tl.float32)
            r += a * per_token * tl.minimum(tl.maximum(dlt, -token_clip), token_clip)
        log_ratio = tl.load(old_ptr + start + offs, mask=ok, other=0.0).to(tl.float32) - \
            tl.load(ref_ptr + start + offs, mask=ok, other=0.0).to(tl.float32)
        r = (r - kl_coef * _kl(log_ratio * m, KL_CODE)) * m
        adv, ret, carry = _gae_block(r, m, values_ptr, mask_ptr, start, offs, ok, length, lanes, carry, gamma,
                                     lam_eff, HAS_VALUES, HAS_MASK)
        tl.store(rewards_ptr + start + offs, r, mask=ok)
        tl.store(adv_ptr + start + offs, adv, mask=ok)
        tl.store(ret_ptr + start + offs, ret, mask=ok)


# ------------------------------------------------------------------------------------------------
# launchers


def _check_shapes(op: str, first: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.shape != first.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, the inputs' is {tuple(first.shape)}")


def _layout(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[int, int, int, bool]:
    """(programs, stride_row, T, packed) for contiguous padded [B, T] or packed [N] + cu_seqlens."""
    if cu_seqlens is not None:
        if x.ndim != 1:
            raise ValueError(f"packed inputs are [N] with cu_seqlens, got {tuple(x.shape)}")
        return cu_seqlens.numel() - 1, 0, 0, True
    if x.ndim != 2:
        raise ValueError(f"padded inputs are [B, T], got {tuple(x.shape)}")
    return x.shape[0], x.stride(0), x.shape[1], False


def _block_t(T: int) -> int:
    return min(max(next_power_of_2(T), 16), 1024)


def _gae(rewards, values, mask, cu_seqlens, gamma, lam):
    """mask: bool or None. Every tensor is made contiguous: the kernel indexes them all with one row stride."""
    _check_shapes("gae", rewards, values=values, mask=mask)
    rewards, values = rewards.contiguous(), values.contiguous()
    cu_seqlens = cu_seqlens.contiguous() if cu_seqlens is not None else None
    programs, stride, T, packed = _layout(rewards, cu_seqlens)
    adv = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    longest = T if not packed else int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if programs else 1
    if programs:
        _gae_kernel[(programs,)](rewards, values, mask_bytes(mask) if mask is not None else rewards,
                                 cu_seqlens if packed else rewards, adv, ret, stride, T, float(gamma), float(lam),
                                 BLOCK_T=_block_t(longest), PACKED=packed, HAS_MASK=mask is not None)
    return adv, ret


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None, gamma: float = 1.0,
        lam: float = 0.95, impl: str = "auto", cu_seqlens: torch.Tensor | None = None):
    """(advantages, returns) fp32. Padded: rewards/values/mask [B, T]. Packed: [N] with cu_seqlens [n+1]
    (mask optional: all tokens count). A token counts where mask != 0 (any dtype; values are never weights).
    Any memory layout. impl: "auto" | "torch" | "triton"."""
    mask = bool_mask(mask)
    if resolve_impl(impl, "gae", rewards, values) == "torch":
        if cu_seqlens is None:
            return gae_ref(rewards, values, mask, gamma, lam)
        return _packed_via_padded(gae_ref, cu_seqlens, (rewards, values), mask, gamma, lam)
    return _gae(rewards, values, mask, cu_seqlens, gamma, lam)


def _packed_via_padded(fn, cu_seqlens, tensors, mask, *args):
    """Run a padded reference on packed rows: scatter to [n, L], call, gather back."""
    from ..attention import padded_index

    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n, L = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    index = padded_index(cu_seqlens, L)
    pad = lambda x: x.new_zeros(n * L).index_copy_(0, index, x).view(n, L)  # noqa: E731
    m = torch.zeros(n * L, dtype=torch.bool, device=index.device)
    m[index] = True if mask is None else bool_mask(mask)
    outs = fn(*[pad(t.float()) for t in tensors], m.view(n, L), *args)
    return tuple(o.reshape(-1)[index] for o in outs)


def coherent_gae(old_logp, ref_logp, sft_logp, pt_logp, values, mask, *, kl_coef: float = 0.0,
                 kl_estimator: str = "k1", granularity: str = "sequence", scale: float = 1.0,
                 token_clip: float | None = None, length_normalize: bool = False, seq_scale=None, seq_shift=None,
                 seq_clip: float | None = None, gamma: float = 1.0, lam: float = 0.95, impl: str = "auto"):
    """Coherent reward + KL shaping + GAE in one launch (padded [B, T]); values None gives returns-to-go.
    Returns (shaped rewards, advantages, returns) [B, T] fp32 and (final R', raw R) [B]. A token counts
    where mask != 0 (any dtype; values are never weights). Any memory layout."""
    mask = bool_mask(mask)
    kw = dict(kl_coef=kl_coef, kl_estimator=kl_estimator, granularity=granularity, scale=scale,
              token_clip=token_clip, length_normalize=length_normalize, seq_scale=seq_scale, seq_shift=seq_shift,
              seq_clip=seq_clip, gamma=gamma, lam=lam)
    if resolve_impl(impl, "coherent_gae", old_logp) == "torch":
        return coherent_gae_ref(old_logp, ref_logp, sft_logp, pt_logp, values, mask, **kw)
    if granularity not in ("sequence", "token"):
        raise ValueError(f"unknown reward granularity {granularity!r}")
    _check_shapes("coherent_gae", old_logp, ref_logp=ref_logp, sft_logp=sft_logp, pt_logp=pt_logp, values=values,
                  mask=mask)
    B, T = old_logp.shape
    out = [torch.empty(B, T, dtype=torch.float32, device=old_logp.device) for _ in range(3)]
    final = torch.empty(B, dtype=torch.float32, device=old_logp.device)
    raw = torch.empty_like(final)
    inputs = [x.contiguous() for x in (old_logp, ref_logp, sft_logp, pt_logp)]
    affine = seq_scale is not None or seq_shift is not None
    a = (seq_scale if seq_scale is not None else torch.ones(B, device=old_logp.device)).float().contiguous()
    b = (seq_shift if seq_shift is not None else torch.zeros(B, device=old_logp.device)).float().contiguous()
    if a.shape != (B,) or b.shape != (B,):
        raise ValueError(f"coherent_gae: seq_scale and seq_shift are [B] = [{B}], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if B:
        _coherent_gae_kernel[(B,)](
            *inputs, values.contiguous() if values is not None else inputs[0], mask_bytes(mask), inputs[0], a, b,
            *out, final, raw,
            inputs[0].stride(0), T, float(kl_coef), float(scale),
            float(token_clip) if token_clip is not None else float("inf"),
            float(seq_clip) if seq_clip is not None else float("inf"), float(gamma), float(lam),
            BLOCK_T=_block_t(T), PACKED=False, HAS_MASK=True, HAS_VALUES=values is not None, HAS_SEQ_AFFINE=affine,
            TOKEN_LEVEL=granularity == "token", LENGTH_NORMALIZE=length_normalize, KL_CODE=KL_CODES[kl_estimator])
    return (*out, final, raw)


# ------------------------------------------------------------------------------------------------
# helpers on top


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{k >= t} gamma^(k - t) r_k over each row's response tokens: [B, T]."""
    return gae(rewards, torch.zeros_like(rewards, dtype=torch.float32), mask, gamma, 1.0)[1]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mask != 0), 0 off-mask."""
    m = bool_mask(mask).to(torch.float32)
    n = m.sum().clamp_min(1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    out = (x - mean) if shift_mean else x
    return out * torch.rsqrt(var + eps) * m


__all__ = ["KL_CODES", "coherent_gae", "coherent_gae_ref", "gae", "gae_ref", "kl_estimate", "masked_whiten",
           "returns_to_go"]
