"""Language-modelling stages on packed micro-batches: `pretrain` (all tokens) and `sft` (responses)."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from .. import dist
from ..batching import EpochSampler, padded_pad_fraction, rank_microbatches
from ..config import LMStageConfig
from ..engine import EngineBase, build_engine
from ..errors import ConfigError
from ..experience import packed_token_logprobs
from ..metrics import device_memory
from ..roles import trainable_model
from ..state import resumable, rng_state, set_rng_state
from ..tokens import TokenizedSet, load_lm_data
from .base import Stage, check_data_spec, check_optim
from .loop import Training, run_training

log = logging.getLogger("srppo_fast")


def lm_train_step(engine: EngineBase, data: TokenizedSet, seq_ids: np.ndarray, budget: int) -> dict:
    """One optimizer step on the sequences `seq_ids` (the same on every rank; each rank runs its balanced share):
    the mean NLL over all their targets, whatever the world size and however they were packed."""
    t0 = time.perf_counter()
    share = rank_microbatches(data, seq_ids, budget, dist.rank(), dist.world_size())
    comm0 = dist.comm_seconds()
    n_targets = int(dist.all_reduce([sum(b.num_targets for b in share.real())])[0])  # the step's, all ranks
    loss_sum = 0.0
    for batch, real in share.on_device(engine.device):
        with engine.autocast():
            logp = packed_token_logprobs(engine.model, batch)
        loss = -logp.sum() * float(real) / max(n_targets, 1)
        engine.backward(loss)
        loss_sum += loss.item()
    loss_sum = float(dist.all_reduce([loss_sum])[0])
    t_step = time.perf_counter()
    stats = engine.step(loss_finite=math.isfinite(loss_sum))
    t_step = time.perf_counter() - t_step
    n_tokens = int(share.rank_tokens.sum())
    elapsed = time.perf_counter() - t0
    lengths = [data.lengths[b.seq_ids] for b in share.real()]
    out = {"loss": loss_sum, **stats, "nonfinite_steps": engine.nonfinite_steps, "tokens": n_tokens,
           "tokens_per_s": n_tokens / elapsed, "microbatches": len(share.batches), "pad_fraction": 0.0,
           "padded_pad_fraction": padded_pad_fraction(lengths), **device_memory(engine.device)}
    if dist.world_size() > 1:
        out.update({"rank_imbalance": share.imbalance, "time/comm": dist.comm_seconds() - comm0,
                    "time/optimizer_step": t_step})
    return out


@torch.no_grad()
def lm_eval_loss(model, data: TokenizedSet, budget: int, device: torch.device, autocast) -> float:
    """Mean NLL per target token over the whole set (each rank its share, summed over the ranks)."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    share = rank_microbatches(data, np.arange(len(data)), budget, dist.rank(), dist.world_size())
    for batch, real in share.on_device(device):
        with autocast():
            logp = packed_token_logprobs(model, batch)
        if real:
            nll -= float(logp.sum())
            count += batch.num_targets
    model.train(was_training)
    nll, count = dist.all_reduce([nll, count])
    return float(nll) / max(float(count), 1.0)


def total_steps(section: LMStageConfig, n: int) -> int:
    if section.max_steps:
        return section.max_steps
    return max(1, math.ceil(section.epochs * math.ceil(n / section.batch_size)))


class LMTraining(Training):
    """An LM stage's steps: packed micro-batches of `batch_size` sequences, the held-out loss at the start, every
    `eval_every` steps and at the end."""

    def __init__(self, ctx, name: str):
        section: LMStageConfig = ctx.cfg.section(name)
        self.ctx, self.name, self.section = ctx, name, section
        self.log_every, self.save_every = section.log_every, section.save_every
        tok = ctx.tokenizer()
        self.ckpt = ckpt = ctx.checkpoint_dir(name)
        load = dict(kind="lm" if section.loss_on == "all" else "sft", loss_on=section.loss_on,
                    max_seq_len=section.max_seq_len, overlong=section.overlong, world_dir=ctx.world_dir)
        self.train = train = load_lm_data(section.data, tok, **load)
        self.held = load_lm_data(section.eval_data, tok, **load) if section.eval_data else None
        log.info("%s: %d sequences, %d tokens, %d targets (%d dropped, %d truncated as longer than %d)", name,
                 len(train), train.tokens.size, train.num_targets, train.dropped, train.truncated, section.max_seq_len)
        self.steps = total_steps(section, len(train))
        self.fingerprint = ctx.fingerprint(name)
        state = self.state = resumable(ckpt, self.fingerprint)
        ctx.check_models(name, {f"{name}.init": section.init})
        model = trainable_model(ctx, section.init, resume_dir=str(ckpt) if state else None)
        self.engine = build_engine(ctx, model, section.optim, self.steps, "model",
                                   resume=(str(ckpt), state["engine"]) if state is not None else None)
        self.sampler = EpochSampler(len(train), ctx.cfg.seed, section.shuffle)
        self.start, self.start_eval = 0, None
        if state is not None:
            self.sampler.position, self.start, self.start_eval = (state["sampler_position"], state["step"],
                                                                  state["start_eval"])
            set_rng_state(state["rng"])

    def engines(self):
        return [(self.engine, self.name)]

    def evaluate(self, step: int) -> float | None:
        if self.held is None:
            return None
        loss = lm_eval_loss(self.engine.model, self.held, self.section.micro_batch_tokens, self.ctx.device,
                            self.engine.autocast)
        self.ctx.metrics.log({"stage": self.name, "step": step, "eval_loss": loss})
        log.info("%s step %d: held-out loss %.4f", self.name, step, loss)
        return loss

    def begin(self, resumed: bool) -> None:
        if not resumed:  # the starting point
            self.start_eval = self.evaluate(0)

    def step(self, step: int) -> dict:
        s = self.section
        return lm_train_step(self.engine, self.train, self.sampler.take(s.batch_size), s.micro_batch_tokens)

    def row(self, step: int, stats: dict, last: bool) -> dict | None:
        if last or step % self.log_every == 0:
            return {"epoch": self.sampler.position / len(self.train), **stats}
        return None

    def after(self, step: int, stats: dict) -> None:
        if self.section.eval_every and step % self.section.eval_every == 0 and step != self.steps:
            self.evaluate(step)

    def postfix(self, stats: dict) -> dict[str, str]:
        return {"loss": f"{stats['loss']:.3f}", "tok_s": f"{stats['tokens_per_s']:.0f}"}

    def save(self, step: int, complete: bool) -> None:
        info, state = {}, None
        if complete:
            info.update(eval_loss_start=self.start_eval, eval_loss_end=self.evaluate(step))
            if self.section.data == "world:corpus" and self.ctx.world_dir:
                with self.engine.autocast():
                    info["careful_skill"] = probe_careful_skill(self.ctx, self.name, self.engine.model,
                                                                self.ctx.tokenizer(), step)
        else:
            state = {"step": step, "engine": self.engine.state_dict(), "sampler_position": self.sampler.position,
                     "start_eval": self.start_eval, "rng": rng_state()}
        self.ctx.save_checkpoint(self.name, {"model": self.engine}, step, complete, self.fingerprint, state, **info)

    def finish(self, steps: int) -> None:
        self.save(steps, complete=True)  # the held-out loss at the end and the final checkpoint
        self.engine.close()


def run_lm_stage(ctx, name: str) -> None:
    """1. data -> 2. model and engine (or the saved state of an interrupted run) -> 3. evaluate the start
    -> 4. train (saving every save_every steps, and on SIGINT/SIGTERM) -> 5. evaluate, save."""
    training = LMTraining(ctx, name)
    run_training(ctx, name, training, training.steps, training.start, training.state is not None)


def probe_careful_skill(ctx, name: str, model, tok, step: int) -> dict[str, float]:
    """After pretraining on the embedded world: has the base learnt the careful skill? (world/probe.py)"""
    from ..world.probe import SKILL_THRESHOLD, careful_skill

    skill = careful_skill(model, tok, ctx.world_dir)
    ctx.metrics.log({"stage": name, "step": step, **{f"careful_skill/{k}": v for k, v in skill.items()}})
    shown = ", ".join(f"{k} {v:.2f}" for k, v in skill.items())
    if min(skill.values()) < SKILL_THRESHOLD:
        log.warning("%s: the base model has not fully learnt the careful skill (accuracy of answers started in "
                    "the careful style: %s; the world needs >= %.1f), so SFT and SRPPO will have little to work "
                    "with. Pretrain longer (%s.epochs) or try another seed.", name, shown, SKILL_THRESHOLD, name)
    else:
        log.info("%s: careful skill (accuracy of answers started in the careful style): %s", name, shown)
    return skill


class LMStage(Stage):
    """Language modelling: next-token loss on every token (pretraining) or on the responses (SFT)."""

    kind = "lm"
    section_type = LMStageConfig

    def validate(self, before: list[str], check_files: bool) -> None:
        s, name = self.section, self.name
        check_data_spec(s.data, f"{name}.data", check_files)
        if s.eval_data is not None:
            check_data_spec(s.eval_data, f"{name}.eval_data", check_files)
        self.check_model_ref(s.init, f"{name}.init", before, check_files)
        if s.micro_batch_tokens < s.max_seq_len:
            raise ConfigError(
                f"{name}.micro_batch_tokens ({s.micro_batch_tokens}) is smaller than {name}.max_seq_len "
                f"({s.max_seq_len}), so a long sequence could not fit a micro-batch; raise "
                f"micro_batch_tokens or lower max_seq_len.")
        check_optim(s.optim, f"{name}.optim")

    def data_specs(self) -> list[str]:
        return [self.section.data] + ([self.section.eval_data] if self.section.eval_data else [])

    def data_checks(self) -> list[tuple[str, str, bool]]:
        kind = "lm" if self.section.loss_on == "all" else "sft"
        return [(spec, kind, False) for spec in self.data_specs()]

    def plan_line(self) -> str:
        s = self.section
        init = s.init if s.init != "base" else f"base={self.cfg.model.base}"
        length = f"max_steps={s.max_steps}" if s.max_steps else f"epochs={s.epochs:g}"
        evals = f" eval={s.eval_data}" if s.eval_data else ""
        return (f"{self.name}: init={init} data={s.data}{evals} loss_on={s.loss_on} {length} batch={s.batch_size} "
                f"micro_batch_tokens={s.micro_batch_tokens} lr={s.optim.lr:g}")

    def describe(self) -> str:
        if self.section.loss_on == "all":
            return "causal language model (next-token loss on every token)"
        return f"supervised fine-tuning (SFT): next-token loss on the {self.section.loss_on} tokens of demonstrations"

    def run(self, ctx) -> None:
        run_lm_stage(ctx, self.name)
