"""The single-process update engine (CPU, or one CUDA device): AdamW, warm-up + decay, clipping,
gradient accumulation over packed micro-batches, bf16 autocast, gradient checkpointing."""

from __future__ import annotations

import contextlib
import math

import torch

from .config import OptimConfig
from .errors import TrainingError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then decay."""
    warmup = int(round(optim.warmup_ratio * total_steps))
    floor = optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if optim.schedule == "constant" or total_steps <= warmup + 1:
            return 1.0
        progress = min(1.0, (step - warmup) / (total_steps - warmup - 1))
        if optim.schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases or 1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TorchEngine:
    """Owns a trainable module, its optimizer and schedule. Callers accumulate gradients with
    `backward(loss)` over micro-batches (each loss already divided by the step's normaliser), then `step()`."""

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, total_steps: int, device: torch.device,
                 precision: str = "fp32", gradient_checkpointing: bool = False):
        self.model = model.to(device)
        self.device = device
        self.precision = precision
        self.optim_cfg = optim
        if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                                           betas=tuple(optim.betas), eps=optim.eps, **extra)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim, total_steps))
        self.steps_done = 0
        self.nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, in all
        self.nonfinite_streak = 0  # ... and in a row, up to the last step

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

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
        self.steps_done += 1
        self.nonfinite_steps += not ok
        self.nonfinite_streak = 0 if ok else self.nonfinite_streak + 1
        return {"grad_norm": grad_norm, "lr": lr, "skipped": float(not ok)}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "steps_done": self.steps_done, "nonfinite_steps": self.nonfinite_steps,
                "nonfinite_streak": self.nonfinite_streak}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = state["steps_done"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.nonfinite_streak = state.get("nonfinite_streak", 0)


def check_divergence(engine: TorchEngine, what: str, step: int, limit: int, last_save: str,
                     final: bool = False) -> None:
    """Stop the run once `limit` optimizer steps in a row were skipped as non-finite, or, at the end of a stage
    (`final`), when every one of its steps was: a stage that never updated its weights has not trained."""
    if (limit and engine.nonfinite_streak >= limit) or (final and engine.steps_done and
                                                         engine.nonfinite_streak == engine.steps_done):
        raise TrainingError(
            f"{what}: {engine.nonfinite_streak} optimizer steps in a row had a non-finite loss or gradient norm "
            f"(the last at step {step}; they were skipped, the weights hold no NaN). The last good checkpoint: "
            f"{last_save}. Likely cause: a learning rate too high (peak {engine.optim_cfg.lr:g}) or rewards too "
            "large (reward.scale, reward.clip); lower it and start the stage again (delete its checkpoint or use "
            "a new output_dir). runtime.max_nonfinite_steps sets this limit.")
