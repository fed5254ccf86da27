"""The single-process engine (CPU, or one CUDA device): torch AdamW, warm-up + decay, clipping, gradient
accumulation over packed micro-batches, gradient checkpointing.

Precision (engine/placement.py): in fp32 the optimizer updates the module's own parameters. In bf16 the module
holds bf16 parameters, so every forward (the update's, and rollout, scoring and eval on the same module) reads
bf16 weights and keeps a bf16 KV cache; the engine keeps fp32 master copies, which AdamW updates and which are
copied (rounded) into the module after each step. Each micro-batch's bf16 gradient is added into the master's
fp32 gradient as soon as autograd has accumulated it (a post-accumulate-grad hook), so the sum over a step's
micro-batches is taken in fp32, as DeepSpeed does with grad_accum_dtype fp32."""

from __future__ import annotations

import math

import torch

from ..config import OptimConfig
from .common import EngineBase, make_adamw
from .placement import cast_parameters_, distinct_parameters


class TorchEngine(EngineBase):
    """Owns a trainable module, its optimizer and schedule. Callers accumulate gradients with
    `backward(loss)` over micro-batches (each loss already divided by the step's normaliser), then `step()`."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, total_steps: int, device: torch.device,
                 precision: str = "fp32", gradient_checkpointing: bool = False):
        super().__init__(optim, total_steps, device, precision)
        self.model = model.to(device)
        if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self._hooks = []
        self.masters: dict[int, torch.nn.Parameter] = {}  # id(module parameter) -> its fp32 master (bf16 runs)
        if self.compute_dtype != torch.float32:
            self._split_master_weights()
        self.optimizer = make_adamw(self._optimized_module(), optim, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_at)

    # -- fp32 master weights (bf16 runs) -----------------------------------------------------------

    def _split_master_weights(self) -> None:
        """The module's trainable parameters become bf16; their fp32 tensors become the masters (no copy: the
        engine's memory is the plan's 18 bytes per parameter from the start)."""
        for p in distinct_parameters(self.model):
            if not p.requires_grad:
                continue
            master = torch.nn.Parameter(p.detach().float())  # the loaded fp32 storage itself
            self.masters[id(p)] = master
            self._hooks.append(p.register_post_accumulate_grad_hook(self._accumulate_into(master)))
        cast_parameters_(self.model, self.compute_dtype)

    @staticmethod
    def _accumulate_into(master: torch.nn.Parameter):
        def hook(p: torch.Tensor) -> None:  # the micro-batch's 16-bit gradient, summed into fp32, then freed
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None
        return hook

    def _optimized_module(self) -> torch.nn.Module:
        """What AdamW steps: the module itself (fp32), or a shadow holding the masters in the module's order
        (so weight-decay groups and the optimizer's state layout follow the module's parameters)."""
        if not self.masters:
            return self.model
        shadow = torch.nn.Module()
        shadow.params = torch.nn.ParameterList([self.masters[id(p)] for p in distinct_parameters(self.model)
                                                if id(p) in self.masters])
        return shadow

    @torch.no_grad()
    def _copy_masters_to_module(self) -> None:
        for p in distinct_parameters(self.model):
            master = self.masters.get(id(p))
            if master is not None:
                p.copy_(master)

    # -- the interface -----------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        loss.backward(retain_graph=retain_graph)

    def step(self, loss_finite: bool = True) -> dict:
        """Clip, step the optimizer and the schedule, zero the gradients. Returns grad norm and lr used.

        A step whose loss (`loss_finite=False`) or gradient norm is not finite leaves the weights and the
        optimizer's moments untouched (`skipped` 1); the schedule still advances, so the lr stays a function
        of the step number. `nonfinite_streak` counts such steps in a row for the caller's stop rule."""
        lr = self.scheduler.get_last_lr()[0]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))  # a sync point on GPU
        ok = loss_finite and math.isfinite(grad_norm)
        if ok:
            self.optimizer.step()
            if self.masters:
                self._copy_masters_to_module()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._record(ok)
        return {"grad_norm": grad_norm, "lr": lr, "skipped": float(not ok)}

    def full_state_dict(self) -> dict:
        """The model's weights for its checkpoint: the fp32 masters where there are masters (the bf16 module
        weights are their rounding), so a resumed run continues from exactly the same weights."""
        state = self.model.state_dict(keep_vars=True)
        return {k: (self.masters.get(id(v), v)).detach() for k, v in state.items()}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), **self.counters()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_counters(state)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.masters = [], {}
        self.optimizer = self.scheduler = None
        super().close()
