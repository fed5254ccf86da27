"""What an RL stage carries from step to step (RLRun): its prompts, models, sampler and running statistics,
the sampler's weights and their check, generation (on-policy or a step ahead), and one step, 1-5."""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from .. import dist
from ..advantages import RunningMoments
from ..batching import EpochSampler
from ..config import RLStageConfig
from ..data import read_records
from ..errors import DataError, SamplerError, TrainingError
from ..generation import Generations, sample_seed
from ..metrics import device_memory
from ..roles import sampler_path
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
from ..state import rng_state, set_rng_state
from ..tokens import prompt_tokens
from ..world import verifier_for
from .models import RLModels, score
from .rewards import rewards_and_advantages, sampler_correction
from .samples import rollout_stats, samples_table
from .update import ppo_update

log = logging.getLogger("srppo_fast")


@dataclass
class Prompts:
    ids: list[list[int]]  # rendered with the generation prompt, tokenized
    questions: list[str]  # the last user message (what a verifier reads)


def load_prompts(spec: str, tokenizer, world_dir: str | None, max_len: int,
                 key: str = "prompts") -> tuple[Prompts, int]:
    ids, questions, dropped = [], [], 0
    records = read_records(spec, "prompt", world_dir)
    for rec in records:
        tokens = prompt_tokens(tokenizer, rec.messages, limit=max_len)
        if len(tokens) > max_len:
            dropped += 1
            continue
        ids.append(tokens)
        questions.append(rec.messages[-1]["content"])
    if not ids:
        raise DataError(f"{key}: all {len(records)} prompts of '{spec}' are longer than max_prompt_len={max_len} "
                        "tokens once rendered with the chat template, so there is nothing to train on; raise "
                        "max_prompt_len.")
    return Prompts(ids, questions), dropped


@dataclass
class PendingRollout:
    """A buffer whose generation was started: its prompts, and this rank's share in flight (vllm) or done."""

    step: int
    chosen: np.ndarray  # prompt indices of the step
    prompt_ids: list[list[int]]
    mine: list[int]  # which of them this rank's sampler answers
    params: SamplingParams
    result: Future | Generations


class RLRun:
    """What an RL stage carries from step to step; `state_dict` is everything a resume needs.

    Rollout with a sampler that holds its own weights (vllm): before a buffer is generated the sampler is
    brought within an allowed lag of the actor (0 on-policy; max_staleness - 1 when generated a step ahead,
    since the next update lands before that buffer trains), and every rollout.sync_check_every syncs (and after
    the first) its log-probs of a probe sequence are compared with the trainer's."""

    def __init__(self, ctx, rl: RLStageConfig, prompts: Prompts, steps: int, state: dict | None, resume_dir: str,
                 stage: str):
        self.ctx, self.rl, self.prompts, self.steps, self.stage = ctx, rl, prompts, steps, stage
        # a sampler with its own weights starts first, while its share of the device is free; then the models
        self.engine = start_sampler(ctx, rl.rollout, sampler_path(ctx, rl.init), f"{stage}.init ({rl.init!r})")
        self.probe = probe_tokens(prompts.ids, rl.max_prompt_len + rl.rollout.max_new_tokens)
        self.models = RLModels(ctx, rl, steps, resume_dir=resume_dir if state else None, state=state)
        if self.engine is None:
            self.engine = HFRolloutEngine(self.models.actor.model, ctx.tokenizer(), rl.rollout.batch_size,
                                          self.models.actor.autocast)
        self.sampler = EpochSampler(len(prompts.ids), ctx.cfg.seed, shuffle=True)
        self.moments = RunningMoments()
        self.version = 0  # actor updates so far: the policy version a sample records
        self.pending: PendingRollout | None = None
        self.params = SamplingParams(n=rl.rollout.n_samples, temperature=rl.rollout.temperature,
                                     top_p=rl.rollout.top_p, max_new_tokens=rl.rollout.max_new_tokens)
        self.verifier = verifier_for(rl.prompts)
        if state is not None:
            self.load_state_dict(state)
        self.end = (self.sampler.position, rng_state())  # where the last complete step left the streams
        self.sync_stats = self.sync_sampler(0)  # a sampler with its own weights gets the actor's (resumed or not)

    def close(self) -> None:
        """Let a buffer generated ahead finish (it is not part of any saved state), then stop the sampler."""
        if self.pending is not None and isinstance(self.pending.result, Future):
            try:
                self.engine.wait(self.pending.result, "generate (discarded at the end of the stage)")
            except SamplerError:
                pass
            self.pending = None
        self.engine.close()

    def state_dict(self, step: int) -> dict:
        """The state after `step`, the last complete step (a buffer generated ahead is not part of it: a resume
        generates it again)."""
        critic = self.models.critic
        position, rng = self.end
        return {"step": step, "actor": self.models.actor.state_dict(),
                "critic": critic.state_dict() if critic is not None else None,
                "sampler_position": position, "reward_moments": self.moments.state_dict(),
                "rng": rng, "policy_version": self.version}

    def load_state_dict(self, state: dict) -> None:  # the engines' states were loaded with them (RLModels)
        self.sampler.position = state["sampler_position"]
        self.moments.load_state_dict(state["reward_moments"])
        self.version = state.get("policy_version", 0)
        set_rng_state(state["rng"])

    # -- the sampler's weights --------------------------------------------------------------------

    def sync_sampler(self, allowed_lag: int) -> dict:
        """Send the actor's weights when the sampler lags more than `allowed_lag` updates behind (always
        the first time); verify them on the probe after the first sync and every sync_check_every."""
        ro = self.rl.rollout
        if not self.engine.owns_weights:  # samples with the actor module itself: its version follows
            self.engine.update_weights(self.models.actor.model, self.version)
            return {}
        if self.engine.syncs and self.version - self.engine.version <= allowed_lag:
            return {}
        error, stats = None, {}
        try:
            stats = self.engine.update_weights(self.models.actor.model, self.version)
        except SamplerError as e:
            error = e
        dist.first_error(error)
        if check_due(self.engine, ro.sync_check_every):
            stats.update(self.verify_sync())
        return stats

    def verify_sync(self) -> dict:
        """The sampler's log-probs of the probe against the trainer's (rollout.verify_sync)."""
        return verify_sync(self.engine, self.models.actor, self.probe, self.ctx.device, self.ctx.precision,
                           self.rl.rollout.sync_check_tol, f"actor update {self.version}")

    # -- generation -------------------------------------------------------------------------------

    def launch(self, step: int) -> PendingRollout:
        """Take the step's prompts and start this rank's share (rollout.my_prompts). Each sample draws from its own
        stream (seed, step, prompt, sample): the buffer does not depend on how the prompts are shared."""
        chosen = self.sampler.take(self.rl.prompts_per_step)
        prompt_ids = [self.prompts.ids[i] for i in chosen]
        mine = my_prompts(self.engine, len(prompt_ids))
        seeds = [sample_seed(self.ctx.cfg.seed, step, int(chosen[i])) for i in mine]
        params = dataclasses.replace(self.params, seeds=seeds)
        params.calls = lockstep_calls(self.engine, len(mine), self.rl.rollout.batch_size // self.params.n)
        result = self.engine.submit([prompt_ids[i] for i in mine], params)
        return PendingRollout(step, chosen, prompt_ids, mine, params, result)

    def gather(self, pending: PendingRollout) -> tuple[Generations, dict]:
        """Wait for this rank's share, then gather the shares so every rank holds the whole buffer in prompt
        order. Returns it with the sampler's own time on it (for the hidden fraction)."""
        error, local, waited = None, None, time.perf_counter()
        try:
            local = self.engine.collect(pending.result, pending.params, f"generate (step {pending.step})")
        except SamplerError as e:
            error = e
        waited = time.perf_counter() - waited
        dist.first_error(error)
        gens, seconds = gather_generations(pending.mine, local, len(pending.prompt_ids), self.params.n)
        info = {"time/generate_wait": waited}
        if seconds:  # the samplers' own time on the buffer, the slowest rank's
            info["time/sampler"] = max(seconds)
        return gens, info

    def rollout(self, step: int) -> tuple[PendingRollout, Generations, dict]:
        """The step's buffer: the one generated ahead (async), else generated now from weights at most 0 updates
        old; then, async, start the next one from weights at most max_staleness - 1 updates old (the update
        of this step lands before it trains)."""
        ro, stats = self.rl.rollout, dict(self.sync_stats)
        self.sync_stats, synced = {}, 0.0
        if self.pending is None or self.pending.step != step:
            t = time.perf_counter()
            stats.update(self.sync_sampler(0))
            synced += time.perf_counter() - t
            self.pending = self.launch(step)
        current, self.pending = self.pending, None
        gens, info = self.gather(current)
        self.engine.sleep()  # on-policy: right after generating, so scoring and the update get the device
        stats.update(info)
        if ro.async_ and step < self.steps:
            t = time.perf_counter()
            stats.update(self.sync_sampler(ro.max_staleness - 1))
            synced += time.perf_counter() - t
            self.pending = self.launch(step + 1)
        stats["time/sync"] = synced
        return current, gens, stats

    def step(self, step: int) -> dict:
        """Steps 1-5 on one rollout buffer; returns its statistics."""
        rl, models, times = self.rl, self.models, {}
        t = time.perf_counter()
        comm0 = dist.comm_seconds()
        # 1-2. prompts and generation (or the buffer generated during the last update)
        current, gens, stats = self.rollout(step)
        chosen, prompt_ids = current.chosen, current.prompt_ids
        times["generate"] = time.perf_counter() - t - stats["time/sync"]
        t = time.perf_counter()
        train_actor = models.critic is None or step > rl.critic.warmup_buffers
        stats.update(self.staleness(gens, train_actor))
        # 3. score
        exp, scores = score(models, [prompt_ids[i] for i in gens.prompt_index], gens, rl.ppo.micro_batch_tokens)
        times["score"], t = time.perf_counter() - t, time.perf_counter()
        # 4. rewards and advantages (and the sampler's importance correction)
        stats.update(rewards_and_advantages(rl, exp, scores, self.moments))
        stats.update(sampler_correction(rl, exp))
        times["advantages"], t = time.perf_counter() - t, time.perf_counter()
        # 5. update
        stats.update(ppo_update(models, exp, train_actor, seed=sample_seed(self.ctx.cfg.seed, step, 1 << 40)))
        if train_actor:
            self.version += 1
        if not self.engine.owns_weights:  # the actor module itself: it follows each update
            self.engine.update_weights(models.actor.model, self.version)
        times["update"] = time.perf_counter() - t
        questions = [self.prompts.questions[chosen[i]] for i in gens.prompt_index]
        stats.update(rollout_stats(exp, gens, self.ctx.tokenizer(), questions, self.verifier))
        every = self.ctx.cfg.logging.samples_every
        if dist.is_main() and every and (step % every == 0 or step == self.steps):
            rng = np.random.default_rng(sample_seed(self.ctx.cfg.seed, step, 1 << 41))
            self.ctx.metrics.log_samples(self.stage, step, samples_table(
                exp, self.ctx.tokenizer(), questions, self.verifier, self.ctx.cfg.logging.num_samples, rng))
        stats.update({f"time/{k}": v for k, v in times.items()})
        total = sum(times.values()) + stats["time/sync"]
        if "time/sampler" in stats:  # how much of the sampler's time the trainer did not wait for
            stats["rollout/hidden_fraction"] = max(0.0, 1.0 - times["generate"] / max(stats["time/sampler"], 1e-9))
        stats["actor_nonfinite_steps"] = models.actor.nonfinite_steps
        if models.critic is not None:
            stats["critic_nonfinite_steps"] = models.critic.nonfinite_steps
        tokens = float(exp.sequences.offsets[-1])
        trained = [e for e in (models.actor if train_actor else None, models.critic) if e is not None]
        stats.update({"time/step": total, "samples_per_s": len(exp.sequences) / total, "rollout/tokens": tokens,
                      # model FLOPs of the update: forward + backward, 6 per parameter per token, each epoch
                      "update/flops": 6.0 * rl.ppo.epochs * tokens * sum(e.num_parameters for e in trained),
                      "actor_trained": float(train_actor), "policy_version": float(self.version)})
        if dist.world_size() > 1:
            stats["time/comm"] = dist.comm_seconds() - comm0  # gathers, score sums, statistics, agreement
        stats.update(device_memory(self.ctx.device))
        position = self.sampler.position - (len(self.pending.chosen) if self.pending is not None else 0)
        self.end = (position, rng_state())
        return stats

    def staleness(self, gens: Generations, train_actor: bool) -> dict:
        """How many actor updates old each sample's weights are when the update trains on it; the bound is
        enforced (0 on-policy, rollout.max_staleness async)."""
        ro = self.rl.rollout
        lag = torch.tensor([self.version - v for v in gens.versions], dtype=torch.float32)
        bound = ro.max_staleness if ro.async_ else 0
        if train_actor and float(lag.max()) > bound:
            raise TrainingError(f"a rollout sample is {int(lag.max())} actor updates old, beyond the bound of {bound} "
                                "(rollout.max_staleness); this is a bug in srppo-fast's rollout pipeline, please "
                                "report it.")
        return {"rollout/staleness_mean": float(lag.mean()), "rollout/staleness_max": float(lag.max())}
