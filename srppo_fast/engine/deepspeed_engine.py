"""The DeepSpeed engine: ZeRO 0-3 data parallelism over any number of processes (torchrun / deepspeed), with
our optimizer (torch AdamW, so nothing compiles), our schedule and our accumulation.

How our keys map onto DeepSpeed's:
  - accumulation: `managed_gradient_accumulation: false`: every micro-batch's backward accumulates and
    `step()` is the boundary, so a step may hold any number of packed micro-batches (the same on every rank).
  - loss normalisation: the stages divide each loss by the whole step's target tokens over all ranks;
    DeepSpeed averages gradients over the ranks, so `backward` multiplies by the world size.
  - schedule: the engine sets the lr of every param group before each step from lr_lambda (a skipped
    step still advances it, as under the torch engine); gradient_clipping = optim.grad_clip.
  - bf16: the module computes in bf16 with fp32 master weights in the optimizer; gradients accumulate over a
    step's micro-batches in fp32 and are reduced in fp32 (grad_accum_dtype, communication_data_type: fp32),
    as the torch engine sums them; DeepSpeed casts parameters only, so the rotary inverse frequencies stay fp32.
  - non-finite steps: ZeRO 1-3 check the reduced gradients and skip the update (DeepSpeed's overflow check);
    under ZeRO 0 we reduce, check the norm and skip the step ourselves.
  - checkpoints: `save_state` writes DeepSpeed's own resumable state (every rank its shards);
    `full_state_dict` gathers ZeRO-3 shards onto rank 0 for the Hugging Face directory.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from .. import dist
from ..config import DeepSpeedConfig, OptimConfig
from .common import EngineBase, make_adamw

log = logging.getLogger("srppo_fast")
STATE_TAG = "state"


def import_deepspeed(device: torch.device):
    """Import DeepSpeed for `device`: its CPU accelerator when the run computes on the CPU; without building
    the CPU's shared-memory all-reduce op (~60 s of g++ on a cold cache, a speed-up only;
    SRPPO_FAST_DS_SHM=1 keeps it); its INFO chatter off."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if device.type == "cpu" and os.environ.get("SRPPO_FAST_DS_SHM") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(ds: DeepSpeedConfig, precision: str, *, optim: OptimConfig | None = None, zero_stage: int | None = None,
              universal: bool = False) -> dict:
    """The DeepSpeed config of one engine: a trainable one (`optim` given) or a frozen, inference-only one."""
    stage = ds.zero_stage if zero_stage is None else zero_stage
    zero: dict = {"stage": stage}
    if optim is not None and ds.offload_optimizer and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param and stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 2**31 - 1,
           "wall_clock_breakdown": False, "zero_optimization": zero, "bf16": {"enabled": precision == "bf16"},
           "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    if optim is not None:
        cfg.update(managed_gradient_accumulation=False, gradient_clipping=float(optim.grad_clip))
        if precision == "bf16" and stage > 1:
            # a step's micro-batches summed in fp32 (DeepSpeed's default for bf16 is bf16), reduced over the ranks
            # in fp32 too: bf16 reduction rounds each micro-batch's gradient before the fp32 sum (measured with 4
            # micro-batches on 2 ranks: 1.4e-3 relative against 7e-7). Stage 0 refuses fp32 accumulation in
            # DeepSpeed 0.19 and stage 1 routes it to BF16_Optimizer, which counted micro-batches twice without
            # DeepSpeed's forward: config.validate refuses bf16 below stage 2.
            cfg.update(data_types={"grad_accum_dtype": "fp32"}, communication_data_type="fp32")
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    return _merge(cfg, ds.config)


class DeepSpeedEngine(EngineBase):
    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, total_steps: int, device: torch.device,
                 precision: str, gradient_checkpointing: bool, ds: DeepSpeedConfig, universal: bool = False):
        super().__init__(optim, total_steps, device, precision)
        deepspeed = import_deepspeed(device)
        dist.init(device)
        if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.zero_stage = ds.zero_stage
        optimizer = make_adamw(model, optim, torch.device("cpu") if ds.offload_optimizer else device)
        self.config = ds_config(ds, precision, optim=optim, universal=universal)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.model = self.ds.module

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        # DeepSpeed's own forward() starts every micro-batch with this; the stages run forwards on the module
        # itself, so it is done here, between that forward and its backward. Without it ZeRO-3 kept only the last
        # micro-batch's gradient of a step and ZeRO-1 with fp32 accumulation (BF16_Optimizer) counted some twice
        # (a step of 3 micro-batches: grad norm 0.72 and 2.65 against 1.23; tests/test_deepspeed.py).
        clear = getattr(self.ds.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        self.ds.backward(self.scale_loss(loss), retain_graph=retain_graph, scale_wrt_gas=False)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * dist.world_size()  # DeepSpeed averages the ranks' gradients; our losses are global shares

    # DeepSpeed's bookkeeping around a backward (ZeRO's gradient hooks, the accumulation epilogue) runs in its
    # own backward(): one engine at a time (0.19.8's torch-style backward left ZeRO-2 without the actor's grads)
    joint_backward = False

    def _set_lr(self) -> float:
        lr = self.optim_cfg.lr * self.lr_at(self.steps_done)
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self, loss_finite: bool = True) -> dict:
        lr = self._set_lr()
        if self.zero_stage == 0 and self.precision != "bf16":  # plain data parallelism, torch's optimizer
            ok, grad_norm = self._step_zero0(loss_finite)
        else:
            before = self.ds.skipped_steps
            self.ds.step()
            norm = self.ds.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
            ok = self.ds.skipped_steps == before and math.isfinite(grad_norm)
        self._record(ok)
        return {"grad_norm": grad_norm, "lr": lr, "skipped": float(not ok)}

    def _step_zero0(self, loss_finite: bool) -> tuple[bool, float]:
        """ZeRO 0 in fp32 checks nothing and reports no norm: average the gradients over the ranks here (DeepSpeed's
        own bucketed all-reduce; its allreduce_gradients() reduces only inside step() in this mode), take their
        norm, and step (without reducing again) only when it is finite."""
        self.ds.buffered_allreduce_fallback(elements_per_buffer=500_000_000)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        ok = dist.agree(loss_finite and math.isfinite(grad_norm))
        if ok:
            self.ds.enable_backward_allreduce = False  # reduced above
            try:
                self.ds.step()
            finally:
                self.ds.enable_backward_allreduce = True
        else:
            self.ds.zero_grad()
        return ok, grad_norm

    def state_dict(self) -> dict:
        return {"deepspeed": {"world_size": dist.world_size(), "zero_stage": self.zero_stage}, **self.counters()}

    def load_state_dict(self, state: dict) -> None:
        self.load_counters(state)

    def save_state(self, directory: str) -> None:
        """Collective: DeepSpeed's resumable state (optimizer shards, every rank) under `directory`."""
        self.ds.save_checkpoint(directory, tag=STATE_TAG, save_latest=False)

    def load_state(self, directory: str, tag: str = STATE_TAG) -> None:
        path, _ = self.ds.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state in {directory}/{tag}")

    def close(self) -> None:
        """Tear the DeepSpeed engine down (its hooks, ZeRO's flat buffers and partitioned state) and drop it."""
        ds, self.ds, self.optimizer = self.ds, None, None
        if ds is not None:
            release(ds)
        super().close()

    def full_state_dict(self) -> dict | None:
        """Collective under ZeRO-3 (the shards are gathered one layer at a time onto rank 0); rank 0 gets the
        whole model's state dict, the other ranks None."""
        own = getattr(self.model, "own_parameters", None)
        if own is not None and self.zero_stage == 3:  # a LoRA role: its adapter (and head) only, never the base
            import deepspeed

            with deepspeed.zero.GatheredParameters(own(), modifier_rank=None):
                state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return state if dist.is_main() else None
        if self.zero_stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()
            return state if dist.is_main() else None
        return self.model.state_dict() if dist.is_main() else None


def frozen_deepspeed(model: torch.nn.Module, device: torch.device, precision: str, ds: DeepSpeedConfig):
    """A frozen model sharded with ZeRO-3 (inference only): returns the module to run forwards on (its engine
    rides on it, for `release`)."""
    deepspeed = import_deepspeed(device)
    dist.init(device)
    engine, *_ = deepspeed.initialize(model=model.eval().requires_grad_(False),
                                      config=ds_config(ds, precision, zero_stage=3))
    engine.eval()
    object.__setattr__(engine.module, "_srppo_deepspeed_engine", engine)  # not a submodule: a plain attribute
    return engine.module


def release(engine) -> None:
    """Tear a DeepSpeed engine down so that its module can be freed: DeepSpeed's own destroy(), then two global
    references that 0.19.8 keeps to every ZeRO-3 engine for good (found with weak references: without this no
    ZeRO-3 model was ever freed): its top module on parameter_offload.FWD_MODULE_STACK, and the parameter
    coordinator in the class-level lru_cache of PartitionedParameterCoordinator.__params_to_release (a memo of
    which parameters a module releases; clearing it only makes live coordinators recompute it)."""
    engine.destroy()
    try:
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    except ImportError:  # pragma: no cover - a DeepSpeed without ZeRO-3 offload
        return
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not engine.module]
    memo = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    # under DeepSpeed's nvtx wrapper, which keeps the lru_cache in its closure (no __wrapped__)
    for fn in [memo, getattr(memo, "__wrapped__", None), *(c.cell_contents for c in getattr(memo, "__closure__", None)
                                                             or ())]:
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


def release_frozen(model: torch.nn.Module) -> None:
    """The frozen_deepspeed counterpart (a model that is no ZeRO-3 shard: nothing to do)."""
    engine = model.__dict__.pop("_srppo_deepspeed_engine", None)
    if engine is not None:
        release(engine)


def convert_to_universal(src: str, dst: str, zero_stage: int) -> None:
    """DeepSpeed's universal checkpoint of `src/state` in `dst/state_universal` (rank 0 only)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=os.path.join(src, STATE_TAG),
                              output_folder=os.path.join(dst, UNIVERSAL_TAG), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, no_strict=False,
                              inject_missing_state=zero_stage < 3)
    ds_to_universal.main(args)


UNIVERSAL_TAG = STATE_TAG + "_universal"
