"""Language-modelling stages on packed micro-batches: `pretrain` (all tokens) and `sft` (responses)."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from .. import dist
from ..batching import PackedBatch, padded_pad_fraction, rank_microbatches
from ..config import LMStageConfig
from ..data import TokenizedSet, load_lm_data
from ..engine import EngineBase, build_engine, check_divergence, save_engines
from ..errors import ConfigError
from ..experience import packed_label_logprobs
from ..metrics import device_memory, progress
from ..modeling import load_model
from ..state import Interrupted, SignalGuard, resumable, rng_state, set_rng_state
from .base import Stage, check_data_spec, check_optim

log = logging.getLogger("srppo_fast")


class EpochSampler:
    """An endless stream of example indices: a seeded permutation per epoch, batches may straddle epochs.
    `position` (examples consumed) is all that a resume needs."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, position: int = 0):
        self.n, self.seed, self.shuffle, self.position = n, seed, shuffle, position

    def _epoch(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            epoch, offset = divmod(self.position, self.n)
            chunk = self._epoch(epoch)[offset:offset + k]
            out.append(chunk)
            self.position += len(chunk)
            k -= len(chunk)
        return np.concatenate(out)


def packed_token_logprobs(model, batch: PackedBatch) -> torch.Tensor:
    """Log-prob of each packed token's label ([N] fp32; 0 where the label is -100)."""
    out = torch.zeros(batch.num_tokens, dtype=torch.float32, device=batch.input_ids.device)
    out[batch.labels[0] != -100] = packed_label_logprobs(model, batch)
    return out


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


def run_lm_stage(ctx, name: str) -> None:
    """1. data -> 2. model and engine (or the saved state of an interrupted run) -> 3. evaluate the start
    -> 4. train (saving every save_every steps, and on SIGINT/SIGTERM) -> 5. evaluate, save."""
    section: LMStageConfig = ctx.cfg.section(name)
    tok = ctx.tokenizer()
    ckpt = ctx.checkpoint_dir(name)
    # 1. data
    load = dict(kind="lm" if section.loss_on == "all" else "sft", loss_on=section.loss_on,
                max_seq_len=section.max_seq_len, overlong=section.overlong, world_dir=ctx.world_dir)
    train = load_lm_data(section.data, tok, **load)
    held = load_lm_data(section.eval_data, tok, **load) if section.eval_data else None
    log.info("%s: %d sequences, %d tokens, %d targets (%d dropped, %d truncated as longer than %d)", name,
             len(train), train.tokens.size, train.num_targets, train.dropped, train.truncated, section.max_seq_len)
    # 2. model and engine
    steps = total_steps(section, len(train))
    fingerprint = ctx.fingerprint(name)
    state = resumable(ckpt, fingerprint)
    ctx.check_models(name, {f"{name}.init": section.init})
    model = load_model(str(ckpt), ctx.cfg.model) if state else ctx.init_model(section.init)
    engine = build_engine(ctx, model, section.optim, steps, "model",
                          resume=(str(ckpt), state["engine"]) if state is not None else None)
    sampler = EpochSampler(len(train), ctx.cfg.seed, section.shuffle)
    start, start_eval = 0, None
    if state is not None:
        sampler.position, start, start_eval = state["sampler_position"], state["step"], state["start_eval"]
        set_rng_state(state["rng"])
    ctx.metrics.drop(name, start if state is not None else None)
    last_save = f"{ckpt} (step {start})" if state is not None else f"none of this stage yet ({name}.save_every)"

    def evaluate(step: int) -> float | None:
        if held is None:
            return None
        loss = lm_eval_loss(engine.model, held, section.micro_batch_tokens, ctx.device, engine.autocast)
        ctx.metrics.log({"stage": name, "step": step, "eval_loss": loss})
        log.info("%s step %d: held-out loss %.4f", name, step, loss)
        return loss

    # 3. the starting point
    if state is None:
        start_eval = evaluate(0)
    # 4. train
    bar = progress(steps, name, ctx.cfg.runtime.progress and dist.is_main())
    bar.update(start)
    with SignalGuard() as guard:
        for step in range(start + 1, steps + 1):
            stats = lm_train_step(engine, train, sampler.take(section.batch_size), section.micro_batch_tokens)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{stats['tokens_per_s']:.0f}")
            if step % section.log_every == 0 or step == steps:
                ctx.metrics.log({"stage": name, "step": step, "epoch": sampler.position / len(train), **stats})
            if section.eval_every and step % section.eval_every == 0 and step != steps:
                evaluate(step)
            check_divergence(engine, name, step, ctx.cfg.runtime.max_nonfinite_steps, last_save, final=step == steps)
            stop = dist.any_true(guard.requested is not None)
            if stop or (section.save_every and step % section.save_every == 0 and step != steps):
                info = {"stage": name, "step": step, "complete": False, "fingerprint": fingerprint}
                ctx.metrics.flush()
                save_engines(ckpt, {"model": engine}, tok, info, {
                    "step": step, "engine": engine.state_dict(), "sampler_position": sampler.position,
                    "start_eval": start_eval, "rng": rng_state()}, card=ctx.model_card(name, info))
                last_save = f"{ckpt} (step {step})"
            if stop:
                bar.close()
                raise Interrupted(f"{name} stopped by {guard.requested or 'a signal to another rank'} after "
                                  f"step {step} "
                                  f"of {steps}; its state is saved in {ckpt}: run the same command to resume.")
    bar.close()
    # 5. evaluate the end, save
    end_eval = evaluate(steps)
    info = {"stage": name, "step": steps, "complete": True, "fingerprint": fingerprint,
            "eval_loss_start": start_eval, "eval_loss_end": end_eval}
    if section.data == "world:corpus" and ctx.world_dir:
        with engine.autocast():
            info["careful_skill"] = probe_careful_skill(ctx, name, engine.model, tok, steps)
    ctx.metrics.flush()
    save_engines(ckpt, {"model": engine}, tok, info, card=ctx.model_card(name, info))
    engine.close()
    log.info("%s: saved %s", name, ckpt)


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
