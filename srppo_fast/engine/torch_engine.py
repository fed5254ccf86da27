"""The single-process engine (CPU, or one CUDA device): torch AdamW, warm-up + decay, clipping, gradient
accumulation over packed micro-batches, bf16 autocast, gradient checkpointing."""

from __future__ import annotations

import math

import torch

from ..config import OptimConfig
from .common import EngineBase, make_adamw


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
        self.optimizer = make_adamw(model, optim, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_at)

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
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._record(ok)
        return {"grad_norm": grad_norm, "lr": lr, "skipped": float(not ok)}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), **self.counters()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_counters(state)
