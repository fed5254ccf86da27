"""Where a model's weights live and in which dtype: the one place the engines, the model loaders and the
--dry-run memory plan take these decisions from, so that what the plan counts is what a run allocates.

    precision   compute dtype   every model's parameters     trainable models also hold
    fp32        fp32            fp32                          fp32 gradients, AdamW moments (fp32)
    bf16        bf16            bf16 (what every forward      fp32 master weights (what AdamW updates),
                                reads: rollout, scoring,      fp32 gradients accumulated over the step's
                                eval, the update)             micro-batches, AdamW moments (fp32)

ZeRO shards the trainable models' states over the ranks (stage 1: master weights and moments; 2: + gradients;
3: + the parameters), and with `deepspeed.shard_frozen` ZeRO-3 shards the frozen models' parameters too; a
shard holds ceil(numel / ranks) elements of every parameter. Only parameters are cast: floating buffers (the
rotary embedding's inverse frequencies) stay fp32, as transformers keeps them when it loads in bf16.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ADAM_MOMENTS = 2  # exp_avg, exp_avg_sq: fp32 each


def compute_dtype(precision: str) -> torch.dtype:
    return DTYPES[precision]


@dataclass(frozen=True)
class Placement:
    """One model's layout on each rank."""

    trainable: bool
    param_dtype: torch.dtype  # the module's parameters: what forwards read
    master_fp32: bool  # trainable, 16-bit parameters: fp32 master copies that the optimizer updates
    sharded: bool  # ZeRO-3: the parameters are sharded over the ranks
    zero_stage: int | None  # the DeepSpeed engine's; None: the torch engine (one process)

    @property
    def param_size(self) -> int:
        return torch.empty((), dtype=self.param_dtype).element_size()

    def param_bytes(self, numels: Iterable[int], world: int) -> int:
        """Bytes of the module's parameters on one rank (numels: every distinct parameter's element count)."""
        if self.sharded:
            return sum(math.ceil(n / world) for n in numels) * self.param_size
        return sum(numels) * self.param_size

    def state_bytes(self, numel: int, world: int) -> dict[str, int]:
        """A trainable model's other states on one rank (approximately: DeepSpeed pads its flat buffers):
        fp32 master weights, fp32 gradients and the AdamW moments, each divided by the ranks where ZeRO
        shards it. {} for a frozen model."""
        if not self.trainable:
            return {}
        stage = self.zero_stage or 0

        def share(sharded: bool) -> int:
            return math.ceil(numel / world) if sharded else numel

        out = {"gradients": 4 * share(stage >= 2),
               "optimizer": 4 * ADAM_MOMENTS * share(stage >= 1)}
        if self.master_fp32:
            out["master weights"] = 4 * share(stage >= 1)
        return out


def placement(precision: str, engine: str, *, trainable: bool, zero_stage: int = 0,
              shard_frozen: bool = True) -> Placement:
    """The layout of a model for a run of `precision` ('fp32' | 'bf16', resolved) on `engine` ('torch' |
    'deepspeed'); zero_stage and shard_frozen are the deepspeed section's."""
    dtype = compute_dtype(precision)
    deepspeed = engine == "deepspeed"
    sharded = deepspeed and zero_stage == 3 and (trainable or shard_frozen)
    return Placement(trainable=trainable, param_dtype=dtype, master_fp32=trainable and dtype != torch.float32,
                     sharded=sharded, zero_stage=zero_stage if deepspeed else None)


def distinct_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter once (a tied head and embedding are one parameter)."""
    return list({id(p): p for p in model.parameters()}.values())


def measured_param_bytes(model: torch.nn.Module) -> int:
    """The bytes the module's parameters take on this rank (a ZeRO-3 shard: its local partition)."""
    total = 0
    for p in distinct_parameters(model):
        local = getattr(p, "ds_tensor", None)
        t = local if local is not None else p
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def cast_parameters_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the parameters (never the buffers: the rotary inverse frequencies stay fp32) in place; tied
    parameters stay tied (the same Parameter object gets the new data)."""
    for p in distinct_parameters(model):
        if p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)
    return model
