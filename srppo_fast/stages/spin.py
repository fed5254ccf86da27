"""The `spin` stage: self-play fine-tuning (Chen et al., 2024), a baseline that, like SRPPO, starts from
pi_SFT and needs no preference labels.

For iteration t = 1..iterations, with pi_t the actor at the iteration's start:
  1. sample     one response y' ~ pi_t(.|x) for every demonstration prompt x (through the rollout engine)
  2. reference  log pi_t(y|x) and log pi_t(y'|x), once, with the actor itself before any update of the
                iteration (it *is* pi_t then: no second copy of the model)
  3. train      epochs of the DPO loss on the pairs (chosen = the demonstration y, rejected = y'):
                -log sigmoid(beta * [(log pi(y|x) - log pi_t(y|x)) - (log pi(y'|x) - log pi_t(y'|x))]),
                log-probs summed over the response tokens; a pair's chosen and rejected sequence are packed
                into the same micro-batch, so each micro-batch's loss is exact on its own
  4. log, save (resumable after any step: the iteration's pairs and reference log-probs are in the state)
SPIN sees only the demonstrations' prompts; it assumes a demonstration always beats the model's own sample.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .. import dist
from ..batching import EpochSampler
from ..config import SpinStageConfig
from ..engine import build_engine
from ..errors import ConfigError, SamplerError
from ..generation import Generations, sample_seed
from ..roles import sampler_path, trainable_model
from ..rollout import (
    HFRolloutEngine,
    SamplingParams,
    check_due,
    gather_generations,
    lockstep_calls,
    my_prompts,
    probe_tokens,
    start_sampler,
    verify_sync,
)
from ..spin_pairs import Demos, build_pairs, iteration_stats, pair_logprobs, spin_train_step, steps_per_iteration
from ..state import resumable, rng_state, set_rng_state
from ..tokens import TokenizedSet
from ..world import verifier_for
from .base import Stage, check_data_spec, check_optim
from .loop import Training, run_training

log = logging.getLogger("srppo_fast")


# ------------------------------------------------------------------------------------------------
# the loss


# ------------------------------------------------------------------------------------------------
# demonstrations and pairs


# ------------------------------------------------------------------------------------------------
# one optimizer step


# ------------------------------------------------------------------------------------------------
# the stage


class SpinSampler:
    """y' ~ pi_t for the demonstration prompts through the stage's rollout.Sampler: the actor module itself (hf) or
    a sampler with its own weights, synced from the actor before each iteration's samples. Each rank answers its
    share of the prompts (rollout.my_prompts); every prompt draws from its own stream (seed, iteration, prompt), so
    the samples do not depend on how they are shared."""

    def __init__(self, ctx, spin: SpinStageConfig, init_path: str, name: str):
        """A sampler with its own weights starts now, before the actor is loaded (its share of the device is free
        then); `attach` gives the sampler its actor."""
        self.ctx, self.spin, self.actor = ctx, spin, None
        self.engine = start_sampler(ctx, spin.rollout, init_path, f"{name}.init ({spin.init!r})")

    def attach(self, engine) -> None:
        """The actor's engine: a sampler without weights of its own samples with its module."""
        self.actor = engine
        if self.engine is None:
            self.engine = HFRolloutEngine(engine.model, self.ctx.tokenizer(), self.spin.rollout.batch_size,
                                          engine.autocast)

    def sample(self, prompts: list[list[int]], iteration: int) -> tuple[Generations, dict]:
        ro, stats = self.spin.rollout, {}
        error = None
        try:
            stats = self.engine.update_weights(self.actor.model, iteration)  # without weights of its own: nothing
        except SamplerError as e:
            error = e
        dist.first_error(error)
        if self.engine.owns_weights and check_due(self.engine, ro.sync_check_every):
            probe = probe_tokens(prompts, self.spin.max_prompt_len + ro.max_new_tokens)
            stats.update(verify_sync(self.engine, self.actor, probe, self.ctx.device, self.ctx.precision,
                                     ro.sync_check_tol, f"SPIN iteration {iteration}"))
        mine = my_prompts(self.engine, len(prompts))
        params = SamplingParams(n=1, temperature=ro.temperature, top_p=ro.top_p, max_new_tokens=ro.max_new_tokens,
                                seeds=[sample_seed(self.ctx.cfg.seed, iteration, i) for i in mine])
        params.calls = lockstep_calls(self.engine, len(mine), ro.batch_size)
        local = None
        try:
            local = self.engine.collect(self.engine.submit([prompts[i] for i in mine], params), params,
                                        f"generate (SPIN iteration {iteration})")
        except SamplerError as e:
            error = e
        dist.first_error(error)
        self.engine.sleep()  # a colocated GPU sampler's memory goes to the updates
        gens, _ = gather_generations(mine, local, len(prompts), 1)
        return gens, stats

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class SpinTraining(Training):
    """SPIN's steps: at the first step of each iteration, pi_t's samples and the reference log-probs of the pairs;
    then DPO steps over the iteration's pairs."""

    def __init__(self, ctx, name: str):
        spin: SpinStageConfig = ctx.cfg.section(name)
        self.ctx, self.name, self.spin = ctx, name, spin
        self.log_every, self.save_every = spin.log_every, spin.save_every
        self.ckpt = ckpt = ctx.checkpoint_dir(name)
        tok = ctx.tokenizer()
        self.demos = demos = Demos(spin.data, tok, ctx.world_dir, spin.max_prompt_len, spin.max_seq_len,
                                   f"{name}.data")
        self.n = n = len(demos.prompts)
        log.info("%s: %d demonstrations (%d dropped as longer than max_prompt_len / max_seq_len)", name, n,
                 demos.dropped)
        self.per_iter = steps_per_iteration(spin, n)
        self.steps = spin.iterations * self.per_iter
        self.fingerprint = ctx.fingerprint(name)
        state = self.state = resumable(ckpt, self.fingerprint)
        ctx.check_models(name, {f"{name}.init": spin.init})
        init_path = sampler_path(ctx, spin.init)
        self.sampler = SpinSampler(ctx, spin, init_path, name)  # one with its own weights starts first
        model = trainable_model(ctx, spin.init, resume_dir=str(ckpt) if state else None)
        self.engine = build_engine(ctx, model, spin.optim, self.steps, "model",
                                   resume=(str(ckpt), state["engine"]) if state is not None else None)
        self.sampler.attach(self.engine)
        self.verifier = verifier_for(spin.data)
        self.start, self.pairs, self.ref, self.identical, self.position = 0, None, None, None, 0
        if state is not None:
            self.start, self.position = state["step"], state["sampler_position"]
            if state["pairs"] is not None:
                self.pairs = TokenizedSet(*(np.asarray(a) for a in state["pairs"]))
                self.ref, self.identical = state["ref"], state["identical"]
            set_rng_state(state["rng"])
        self.iteration, self.first = 0, {}

    def engines(self):
        return [(self.engine, self.name)]

    def step(self, step: int) -> dict:
        spin, n = self.spin, self.n
        iteration, k = divmod(step - 1, self.per_iter)
        self.iteration = iteration = iteration + 1
        self.first = first = {}  # a new iteration's statistics, logged with its first step
        if k == 0 or self.pairs is None:  # a new iteration: pi_t's samples and reference log-probs
            t = time.perf_counter()
            gens, sync = self.sampler.sample(self.demos.prompts, iteration)
            t_gen = time.perf_counter() - t
            self.pairs = build_pairs(self.demos, gens.responses)
            self.ref = pair_logprobs(self.engine, self.pairs, spin.micro_batch_tokens)
            first, self.identical = iteration_stats(self.demos, self.pairs, gens, self.ctx.tokenizer(), self.verifier)
            first.update(sync)  # the sampler's weight sync (vllm): sync/seconds, sync/bytes, sync/buckets
            first.update({"time/generate": t_gen, "time/reference": time.perf_counter() - t - t_gen})
            self.first = first
            log.info("%s iteration %d/%d: %d samples, %.0f%% identical to their demonstration%s", self.name,
                     iteration, spin.iterations, n, 100 * first["spin/identical_fraction"],
                     f", sample accuracy {first['spin/sample_accuracy']:.3f}" if self.verifier else "")
            self.position = 0
        order = EpochSampler(n, sample_seed(self.ctx.cfg.seed, iteration), spin.shuffle, self.position)
        chosen = order.take(spin.batch_size)
        self.position = order.position
        return spin_train_step(self.engine, self.pairs, self.ref, self.identical, chosen, spin.beta,
                               spin.micro_batch_tokens)

    def row(self, step: int, stats: dict, last: bool) -> dict | None:
        if last or step % self.log_every == 0 or self.first:
            return {"iteration": self.iteration, "epoch": self.iteration - 1 + self.position / self.n, **stats,
                    **self.first}
        return None

    def postfix(self, stats: dict) -> dict[str, str]:
        return {"loss": f"{stats['loss']:.3f}", "margin": f"{stats['rewards/margin']:.2f}"}

    def save(self, step: int, complete: bool) -> None:
        info, state = {}, None
        if complete:
            info["iterations"] = self.spin.iterations
        else:
            done = step % self.per_iter == 0  # the next step starts a new iteration: no pairs to keep
            pairs = self.pairs
            state = {"step": step, "engine": self.engine.state_dict(), "sampler_position": self.position,
                     "pairs": None if done else (pairs.tokens, pairs.targets, pairs.offsets),
                     "ref": None if done else self.ref, "identical": None if done else self.identical,
                     "rng": rng_state()}
        self.ctx.save_checkpoint(self.name, {"model": self.engine}, step, complete, self.fingerprint, state, **info)

    def close(self) -> None:
        self.sampler.close()

    def finish(self, steps: int) -> None:
        self.save(steps, complete=True)
        self.engine.close()


def run_spin_stage(ctx, name: str) -> None:
    """Demonstrations -> actor engine (or an interrupted run's state) -> iterations of: sample, reference
    log-probs, DPO epochs -> the final checkpoint."""
    training = SpinTraining(ctx, name)
    run_training(ctx, name, training, training.steps, training.start, training.state is not None)


class SpinStage(Stage):
    """SPIN: per iteration, sample the model's own responses to the demonstrations' prompts, then the DPO loss of
    demonstration against sample, with the iteration's starting model as the reference."""

    kind = "spin"
    section_type = SpinStageConfig

    def validate(self, before: list[str], check_files: bool) -> None:
        spin, name = self.section, self.name
        check_data_spec(spin.data, f"{name}.data", check_files)
        self.check_model_ref(spin.init, f"{name}.init", before, check_files)
        ro = spin.rollout
        if ro.n_samples != 1:
            raise ConfigError(f"{name}.rollout.n_samples is {ro.n_samples}: SPIN pairs each demonstration with one "
                              "sample of the model's own; set it to 1.")
        if ro.async_ or ro.tis_cap is not None:
            raise ConfigError(f"{name}.rollout.{'async' if ro.async_ else 'tis_cap'} is set, but SPIN samples once per "
                              "iteration from pi_t itself (nothing runs ahead or off-policy); remove it.")
        self.check_rollout()
        longest = max(spin.max_seq_len, spin.max_prompt_len + ro.max_new_tokens)
        if spin.micro_batch_tokens < 2 * longest:
            raise ConfigError(f"{name}.micro_batch_tokens ({spin.micro_batch_tokens}) cannot hold a pair: its chosen "
                              f"and rejected sequences share a micro-batch and can take {2 * longest} tokens "
                              f"(2 x max(max_seq_len, max_prompt_len + rollout.max_new_tokens)); raise it to at least "
                              f"{2 * longest} or shorten those.")
        check_optim(spin.optim, f"{name}.optim")

    def data_specs(self) -> list[str]:
        return [self.section.data]

    def data_checks(self) -> list[tuple[str, str, bool]]:
        return [(self.section.data, "sft", True)]

    def rollout(self):
        return self.section.rollout

    def plan_line(self) -> str:
        s = self.section
        length = f"iterations={s.iterations} x epochs={s.epochs:g}"
        return (f"{self.name}: init={s.init} demonstrations={s.data} {length} beta={s.beta:g} "
                f"pairs/step={s.batch_size} "
                f"sampler={s.rollout.engine}(T={s.rollout.temperature:g}, max_new_tokens={s.rollout.max_new_tokens}) "
                f"micro_batch_tokens={s.micro_batch_tokens} lr={s.optim.lr:g}")

    def describe(self) -> str:
        return "self-play fine-tuning (SPIN): DPO loss of the demonstrations against the model's own samples"

    def run(self, ctx) -> None:
        run_spin_stage(ctx, self.name)
