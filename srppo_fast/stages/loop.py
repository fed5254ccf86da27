"""The loop every trainable stage runs. A stage supplies a `Training` (its step, its metrics row, its resumable
state and final save); the loop owns the rest, the same for every kind: dropping the metric rows past the last save,
the progress bar, the signal guard, the non-finite stop rule, `save_every`, saving before it stops on a signal, and
the messages a stopped stage ends with."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from .. import dist, faults
from ..engine import check_divergence
from ..errors import SamplerError
from ..metrics import progress
from ..state import Interrupted, SignalGuard

log = logging.getLogger("srppo_fast")


class Training:
    """One trainable stage's run, step by step. Subclasses implement `step`, `row`, `save` and `finish`."""

    log_every: int = 1
    save_every: int = 0
    saves_before_a_failed_step = False  # a sampler failing mid-step: save the last complete step first

    def engines(self) -> list[tuple[Any, str]]:
        """(engine, name in messages) of every engine whose non-finite steps stop the run."""
        return []

    def begin(self, resumed: bool) -> None:
        """After the stage's old metric rows past its last save are dropped, before the first step."""

    def step(self, step: int) -> dict:
        """Train one step; return its statistics."""
        raise NotImplementedError

    def row(self, step: int, stats: dict, last: bool) -> dict | None:
        """The step's metrics row (without stage and step), or None when it is not logged (the last step always is)."""
        return stats if last or step % self.log_every == 0 else None

    def after(self, step: int, stats: dict) -> None:
        """After the step is logged (evaluations every N steps)."""

    def postfix(self, stats: dict) -> dict[str, str]:
        """The progress bar's figures."""
        return {}

    def save(self, step: int, complete: bool) -> None:
        """A resumable checkpoint after `step` (complete: the stage's final one)."""
        raise NotImplementedError

    def close(self) -> None:
        """However the loop ended: stop what runs beside the training (a sampler)."""

    def finish(self, steps: int) -> None:
        """After the last step: final evaluation, the complete checkpoint, the engines released."""
        raise NotImplementedError


def run_training(ctx, name: str, training: Training, steps: int, start: int, resumed: bool) -> None:
    """Steps start+1..steps of `training`, then its finish. `start`: the last step of a resumed state (0 fresh)."""
    ckpt = ctx.checkpoint_dir(name)
    ctx.metrics.drop(name, start if resumed else None)  # a re-run replaces the stage's rows, never doubles them
    last_save = f"{ckpt} (step {start})" if resumed else f"none of this stage yet ({name}.save_every)"
    training.begin(resumed)
    bar = progress(steps, name, ctx.cfg.runtime.progress and dist.is_main())
    bar.update(start)
    with SignalGuard() as guard, contextlib.closing(training):
        for step in range(start + 1, steps + 1):
            try:
                stats = training.step(step)
            except SamplerError as e:  # nothing of this step is trained yet: keep what the last one left
                if training.saves_before_a_failed_step and step - 1 > start:
                    training.save(step - 1, complete=False)
                    last_save = f"{ckpt} (step {step - 1})"
                bar.close()
                raise SamplerError(f"{name} step {step}: {e} Last resumable checkpoint: {last_save}; run the same "
                                   "command to resume from it.") from e
            row = training.row(step, stats, last=step == steps)
            if row is not None:
                ctx.metrics.log({"stage": name, "step": step, **row})
            faults.point("step_logged", stage=name, step=step)  # tests: a signal at an exact step
            training.after(step, stats)
            bar.update(1)
            bar.set_postfix(**training.postfix(stats))
            for engine, what in training.engines():
                check_divergence(engine, what, step, ctx.cfg.runtime.max_nonfinite_steps, last_save,
                                 final=step == steps)
            stop = dist.any_true(guard.requested is not None)
            if stop or (training.save_every and step % training.save_every == 0 and step != steps):
                training.save(step, complete=False)
                last_save = f"{ckpt} (step {step})"
            if stop:
                bar.close()
                raise Interrupted(f"{name} stopped by {guard.requested or 'a signal to another rank'} after step "
                                  f"{step} of {steps}; its state is saved in {ckpt}: run the same command to resume.")
    bar.close()
    training.finish(steps)
    log.info("%s: saved %s", name, ckpt)
