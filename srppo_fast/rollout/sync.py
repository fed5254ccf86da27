"""The trainer's side of a weight sync: the actor's parameters in buckets of a bounded size.

One call per bucket, never one per parameter (the per-tensor broadcast that makes syncs slow). Under ZeRO-3 a
bucket's shards are gathered while that bucket is being sent and released after it, so no rank ever holds more
than one bucket of full parameters beside its shards. Tied parameters (an lm_head sharing the embedding)
appear once, under the name `named_parameters` gives them; the sampler's loader ties them again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 shard knows its full size


def served_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of what a sampler serves for `model`: its parameters, or for a LoRA role (lora.RoleView)
    the plain model's, with the adapter merged into each weight when it is read."""
    merged = getattr(model, "sync_parameters", None)
    return merged() if merged is not None else list(model.named_parameters())


def bucket_plan(model: torch.nn.Module, bucket_bytes: int,
                dtype: torch.dtype) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """The parameters in order, grouped so that each group's tensors take at most `bucket_bytes` in `dtype`
    (a parameter larger than that is a bucket of its own)."""
    size = torch.empty((), dtype=dtype).element_size()
    buckets, current, used = [], [], 0
    for name, p in served_parameters(model):
        nbytes = _numel(p) * size
        if current and used + nbytes > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append((name, p))
        used += nbytes
    if current:
        buckets.append(current)
    return buckets


def _gathered(params: list[torch.nn.Parameter]):
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)


@torch.no_grad()
def weight_buckets(model: torch.nn.Module, bucket_bytes: int, dtype: torch.dtype,
                   device: torch.device | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield each bucket as (name, tensor) pairs in `dtype` on `device` (default: where the parameter is). The
    tensors are valid until the next bucket is asked for: send them before. Under ZeRO-3 every rank must
    iterate to the end (gathering is collective)."""
    for bucket in bucket_plan(model, bucket_bytes, dtype):
        with _gathered([p for _, p in bucket]):
            yield [(name, _value(p, device, dtype)) for name, p in bucket]


def _value(p, device: torch.device | None, dtype: torch.dtype) -> torch.Tensor:
    t = p.value() if hasattr(p, "value") else p.detach()  # a LoRA role's weight: merged here
    return t.to(device=device or t.device, dtype=dtype)
