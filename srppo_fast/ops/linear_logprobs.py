"""Log-probs fused with the lm_head matmul: the [N, V] logits are never materialised.

Shapes: hidden [N, H], weight [V, H] (the lm_head), labels [N] -> log-probs [N] fp32 (and
entropies). The tokens are processed in chunks of C rows: logits_c = hidden_c @ weight.T (cuBLAS,
[C, V] workspace) -> the token_logprobs kernel -> discarded. The backward recomputes each chunk's
logits, turns them into the gradient in place (the same kernel's backward), and accumulates
grad_hidden_c = grad_c @ weight and grad_weight += grad_c.T @ hidden_c (one GEMM in the inputs' dtype
into an fp32 accumulator). Peak extra memory is
one chunk's logits (`chunk_bytes`), not N x V. Frozen models (no grad) take the forward only.
"""

from __future__ import annotations

import torch

from ._triton import resolve_impl
from .logprobs import _token_logprobs_bwd, _token_logprobs_fwd, token_logprobs_ref

DEFAULT_CHUNK_BYTES = 256 << 20  # logits workspace per chunk


def linear_token_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              temperature: float = 1.0, return_entropy: bool = False, ignore_index: int = -100):
    """The specification: full logits, then token_logprobs_ref."""
    return token_logprobs_ref(hidden @ weight.t(), labels, temperature, return_entropy, ignore_index)


def chunk_rows(V: int, element_size: int, chunk_bytes: int) -> int:
    """Rows per chunk so that a [rows, V] logits workspace stays within chunk_bytes (a multiple of 64)."""
    rows = max(1, chunk_bytes // max(1, V * element_size))
    return max(64, rows // 64 * 64) if rows >= 64 else rows


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b. 16-bit CUDA operands stay 16-bit: one tensor-core GEMM that accumulates into
    the fp32 buffer (cuBLAS with an fp32 output); upcasting them first would run the GEMM in fp32, several
    times slower on a GPU. Elsewhere (the CPU, fp32 operands) in fp32."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


class LinearTokenLogprobsFunction(torch.autograd.Function):
    # Both passes run with autocast off, on inputs that linear_token_logprobs already cast to the compute dtype
    # (autocast's, when it is on): the backward recomputes each chunk's logits in the dtype the forward's
    # log-sum-exp came from, so its probabilities sum to one.
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, return_entropy, ignore_index, rows):
        N = hidden.shape[0]
        logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if return_entropy else None
        for start in range(0, N, rows):
            sl = slice(start, min(start + rows, N))
            logits = hidden[sl] @ weight.t()  # [C, V]: the only V-wide buffer
            lp, ls, en = _token_logprobs_fwd(logits, labels[sl], temperature, return_entropy, ignore_index)
            logp[sl], lse[sl] = lp, ls
            if return_entropy:
                entropy[sl] = en
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.rows = temperature, ignore_index, rows
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):  # a backward() called under autocast
            return LinearTokenLogprobsFunction._backward(ctx, grad_logp, grad_entropy)

    @staticmethod
    def _backward(ctx, grad_logp, grad_entropy):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        N, rows = hidden.shape[0], ctx.rows
        for start in range(0, N, rows):
            sl = slice(start, min(start + rows, N))
            logits = hidden[sl] @ weight.t()
            grad = _token_logprobs_bwd(logits, labels[sl], lse[sl], entropy[sl] if entropy is not None else None,
                                       grad_logp[sl] if grad_logp is not None else None,
                                       grad_entropy[sl] if grad_entropy is not None else None,
                                       ctx.temperature, ctx.ignore_index, inplace=True)  # [C, V] in place
            if grad_hidden is not None:
                grad_hidden[sl] = grad @ weight
            if grad_weight is not None:
                _accumulate_fp32(grad_weight, grad.t(), hidden[sl])
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 1.0, return_entropy: bool = False, ignore_index: int = -100,
                          impl: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """log p(labels) under softmax(hidden @ weight.T / temperature) without the [N, V] logits.

    hidden [N, H] (or [..., H]), weight [V, H], labels [N] (or [...]), any memory layout. impl as token_logprobs.
    Under autocast both matmuls of each chunk (forward and the backward's recomputation) run in autocast's dtype,
    as a plain `hidden @ weight.T` would; outside it, in the activations' dtype."""
    if resolve_impl(impl, "linear_token_logprobs", hidden, weight) == "torch":
        return linear_token_logprobs_ref(hidden, weight, labels, temperature, return_entropy, ignore_index)
    if hidden.shape[-1] != weight.shape[-1] or weight.ndim != 2:
        raise ValueError(f"linear_token_logprobs: hidden [..., H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    lead = hidden.shape[:-1]
    # labels contiguous once here: both passes slice them per chunk (hidden and weight go through matmuls,
    # which take any layout; the kernels only see the matmul's contiguous logits)
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).contiguous()
    if flat_labels.shape[0] != flat_hidden.shape[0]:
        raise ValueError("linear_token_logprobs: one label per hidden row")
    device_type = flat_hidden.device.type
    # the compute dtype: autocast's when it is on (as for any matmul under it), else the activations'; the casts
    # are autograd ops outside the Function, so gradients reach fp32 inputs in fp32
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else flat_hidden.dtype
    flat_hidden, weight = flat_hidden.to(dtype), weight.to(dtype)
    rows = chunk_rows(weight.shape[0], torch.finfo(dtype).bits // 8, chunk_bytes)
    with torch.autocast(device_type, enabled=False):
        out = LinearTokenLogprobsFunction.apply(flat_hidden, weight, flat_labels, float(temperature), return_entropy,
                                                ignore_index, rows)
    if return_entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead)


def workspace_bytes(N: int, V: int, element_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """The logits workspace the fused op allocates at once (for benchmark reports)."""
    return min(N, chunk_rows(V, element_size, chunk_bytes)) * V * element_size if N else 0


__all__ = ["linear_token_logprobs", "linear_token_logprobs_ref", "workspace_bytes"]
