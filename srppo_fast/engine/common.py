"""What every engine shares: device and precision, the learning-rate schedule, weight-decay groups, the
non-finite step bookkeeping and the divergence stop rule."""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from ..config import OptimConfig
from ..errors import TrainingError
from .placement import compute_dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """The compute-precision context of every forward of a run: bf16 autocast, or nothing in fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    """Weight decay on matrices only (not on norms, biases or 1-D parameters). The test is the parameter's
    full shape (`ds_shape` under ZeRO-3, whose local tensors are flat)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))
            (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas),
                             eps=optim.eps, **extra)


class EngineBase:
    """The engine interface the stages use (they never ask which engine they have):

        model            the module to run forwards on (under ZeRO-3 its parameters are shards)
        autocast()       the compute-precision context for forwards
        backward(loss)   accumulate gradients of this rank's share of a loss already normalised over the whole
                         optimizer step (all ranks): the engine makes the reduced gradient that loss's gradient
        step(ok)         clip, update, advance the schedule; {"grad_norm", "lr", "skipped"}
        steps_done, nonfinite_steps, nonfinite_streak
        state_dict() / load_state_dict()     small state that travels in trainer_state.pt
        save_state(dir) / load_state(dir)    the optimizer's state, written by every rank into a checkpoint
        full_state_dict()                    the whole model's weights on rank 0 (gathered from ZeRO-3 shards)
        close()                              release the model, optimizer and engine (the stage is done)
    """

    name = "base"

    def __init__(self, optim: OptimConfig, total_steps: int, device: torch.device, precision: str):
        self.optim_cfg, self.total_steps, self.device, self.precision = optim, total_steps, device, precision
        self.lr_at = lr_lambda(optim, total_steps)
        self.steps_done = 0
        self.nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, in all
        self.nonfinite_streak = 0  # ... and in a row, up to the last step

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.precision)

    def autocast(self):
        return autocast(self.device, self.precision)

    joint_backward = True  # its loss may join other engines' in one autograd pass (backward_together)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def _record(self, ok: bool) -> None:
        self.steps_done += 1
        self.nonfinite_steps += not ok
        self.nonfinite_streak = 0 if ok else self.nonfinite_streak + 1

    def counters(self) -> dict:
        return {"steps_done": self.steps_done, "nonfinite_steps": self.nonfinite_steps,
                "nonfinite_streak": self.nonfinite_streak}

    def load_counters(self, state: dict) -> None:
        self.steps_done = state["steps_done"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.nonfinite_streak = state.get("nonfinite_streak", 0)

    def save_state(self, directory: str) -> None:  # the torch engine's state travels in state_dict()
        pass

    def load_state(self, directory: str) -> None:
        pass

    def full_state_dict(self) -> dict | None:
        return self.model.state_dict()

    def close(self) -> None:
        """The stage is done with this engine: drop the references to its model and optimizer so that they are
        freed before the next stage loads its own (runner.release_memory collects them)."""
        self.model = None

    @functools.cached_property
    def num_parameters(self) -> int:
        """The whole model's parameter count (a ZeRO-3 shard counts as its full parameter)."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.model.parameters())


def backward_together(pairs: list[tuple[EngineBase, torch.Tensor]]) -> None:
    """Backpropagate the losses of several engines (the fused PPO op's actor and critic losses) in one autograd
    pass when every engine allows it, else one engine at a time (the shared graph kept until the last)."""
    if len(pairs) == 1:
        pairs[0][0].backward(pairs[0][1])
    elif all(engine.joint_backward for engine, _ in pairs):
        torch.autograd.backward([engine.scale_loss(loss) for engine, loss in pairs])
    else:
        for i, (engine, loss) in enumerate(pairs):
            engine.backward(loss, retain_graph=i < len(pairs) - 1)


def check_divergence(engine: EngineBase, what: str, step: int, limit: int, last_save: str,
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
