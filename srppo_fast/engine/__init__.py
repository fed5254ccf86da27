"""Update engines, and the few things about them the stages need: building one (trainable or frozen) for the
run's `runtime.engine`, and saving a checkpoint from every rank. The stages talk to `EngineBase`'s
interface only and never ask which engine they have.

    torch       one process: torch AdamW (torch_engine.py)
    deepspeed   ZeRO 0-3 over any number of processes (deepspeed_engine.py)
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from pathlib import Path

import torch

from .. import dist
from ..errors import CheckpointError
from .common import (
    EngineBase,
    autocast,
    backward_together,
    check_divergence,
    lr_lambda,
    param_groups,
    resolve_device,
    resolve_precision,
)
from .torch_engine import TorchEngine

__all__ = ["EngineBase", "TorchEngine", "autocast", "check_divergence", "lr_lambda", "param_groups", "resolve_device",
           "resolve_precision", "backward_together", "build_engine", "frozen_model", "release_frozen", "save_engines"]

log = logging.getLogger("srppo_fast")
DS_STATE_DIR = "deepspeed"  # a resumable checkpoint's DeepSpeed state: deepspeed/<engine label>/state/


def build_engine(ctx, model: torch.nn.Module, optim, total_steps: int, label: str,
                 resume: tuple[str, dict] | None = None) -> EngineBase:
    """A trainable engine of kind ctx.engine_kind for `model`. `resume`: (checkpoint directory, the engine's
    saved state_dict) of an interrupted run, whose optimizer state is loaded back."""
    kind = ctx.engine_kind
    if resume is not None:
        saved = "deepspeed" if "deepspeed" in resume[1] else "torch"
        if saved != kind:
            raise CheckpointError(f"{resume[0]} was saved by the {saved} engine but this run uses the {kind} engine "
                                  f"(runtime.engine); resume with runtime.engine={saved}, or delete that checkpoint "
                                  "to start the stage over.")
    gc = ctx.cfg.model.gradient_checkpointing
    if kind == "torch":
        engine = TorchEngine(model, optim, total_steps, ctx.device, ctx.precision, gc)
        ctx.owned.append(engine)  # closed when the stage ends, however it ends
        if resume is not None:
            engine.load_state_dict(resume[1])
        ctx.track(ctx.stage, label, engine.model)
        return engine
    from .deepspeed_engine import DeepSpeedEngine

    ds = ctx.cfg.deepspeed
    saved = resume[1]["deepspeed"] if resume is not None else None
    universal = saved is not None and (saved["world_size"] != dist.world_size() or saved["zero_stage"] != ds.zero_stage)
    engine = DeepSpeedEngine(model, optim, total_steps, ctx.device, ctx.precision, gc, ds, universal=universal)
    ctx.owned.append(engine)
    if resume is not None:
        state_dir = os.path.join(resume[0], DS_STATE_DIR, label)
        if universal:
            _load_universal(ctx, engine, state_dir, label, saved)
        else:
            engine.load_state(state_dir)
        engine.load_state_dict(resume[1])
    ctx.track(ctx.stage, label, engine.model)
    return engine


def _load_universal(ctx, engine, state_dir: str, label: str, saved: dict) -> None:
    from .deepspeed_engine import UNIVERSAL_TAG, convert_to_universal

    work = Path(ctx.out) / "checkpoints" / f".{label}.universal"
    error = None
    if dist.is_main():
        log.warning("%s: resuming at world size %d, ZeRO-%d from a checkpoint saved at world size %d, ZeRO-%d: "
                    "through DeepSpeed's universal checkpoint (converting %s)", label, dist.world_size(),
                    ctx.cfg.deepspeed.zero_stage, saved["world_size"], saved["zero_stage"], state_dir)
        try:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.redirect_stdout(io.StringIO()):  # the converter prints every step
                convert_to_universal(state_dir, str(work), saved["zero_stage"])
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = CheckpointError(f"converting {state_dir} to a universal checkpoint failed: {e}")
    dist.first_error(error)
    engine.load_state(str(work), UNIVERSAL_TAG)
    dist.barrier()
    if dist.is_main():
        shutil.rmtree(work, ignore_errors=True)


def frozen_model(ctx, model: torch.nn.Module) -> torch.nn.Module:
    """A model that only runs forwards (pi_SFT, pi_PT, a reward model): sharded with ZeRO-3 under the DeepSpeed
    engine at zero_stage 3 with deepspeed.shard_frozen, otherwise a whole copy on this rank's device."""
    ds = ctx.cfg.deepspeed
    if ctx.engine_kind == "deepspeed" and ds.zero_stage == 3 and ds.shard_frozen:
        from .deepspeed_engine import frozen_deepspeed

        return frozen_deepspeed(model, ctx.device, ctx.precision, ds)
    return model.to(ctx.device).eval().requires_grad_(False)


def release_frozen(model: torch.nn.Module | None) -> None:
    """The stage is done with a frozen model: tear down the DeepSpeed engine that shards it, if one does."""
    if model is not None and "_srppo_deepspeed_engine" in model.__dict__:
        from .deepspeed_engine import release_frozen as release

        release(model)


def save_engines(path, engines: dict[str, EngineBase], tokenizer, info: dict, trainer_state: dict | None = None,
                 *, card: str | None = None) -> None:
    """Collective: a stage's checkpoint, atomically. Rank 0 writes the Hugging Face directory of the first
    engine's model (gathered from ZeRO-3 shards) with the others in subdirectories named by their labels, the
    marker, the model card `card` (README.md) and `trainer_state` (a resumable save); every DeepSpeed rank adds
    its optimizer shards under deepspeed/<label>/ (resumable saves only). An error on any rank (weights that are
    not finite included) is raised on every rank."""
    from ..modeling import save_checkpoint
    from ..state import TRAINER_STATE

    labels = list(engines)
    states = {label: engines[label].full_state_dict() for label in labels}  # collective under ZeRO-3
    ds_states = trainer_state is not None and any(e.name == "deepspeed" for e in engines.values())

    def write_engine_states(tmp: str) -> None:
        err = None
        try:
            for label in labels:
                engines[label].save_state(os.path.join(tmp, DS_STATE_DIR, label))
        except Exception as e:  # noqa: BLE001 - re-raised on every rank
            err = e
        dist.first_error(err)

    sent = False

    def before(tmp: str) -> None:  # rank 0, inside the temporary directory: the other ranks write there too
        nonlocal sent
        dist.broadcast_object(tmp)
        sent = True
        write_engine_states(tmp)

    error = None
    if dist.is_main():
        try:
            first, rest = labels[0], labels[1:]
            save_checkpoint(path, engines[first].model, tokenizer, info,
                            {TRAINER_STATE: trainer_state} if trainer_state is not None else None,
                            {label: engines[label].model for label in rest} or None,
                            state_dicts=states, before=before if ds_states else None, card=card)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = e
        if ds_states and not sent:
            dist.broadcast_object(None)  # failed before the other ranks were told where to write
    elif ds_states:
        try:
            tmp = dist.broadcast_object(None)
            if tmp is not None:
                write_engine_states(tmp)
        except Exception as e:  # noqa: BLE001
            error = e
    dist.first_error(error)
