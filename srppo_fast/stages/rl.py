"""On-policy RL stages: `srppo` (the coherent reward) and `ppo_rm` (an external reward model).

One step = one rollout buffer:
  1. prompts      prompts_per_step from a seeded stream over the prompt set
  2. generate     rollout.n_samples responses per prompt from the current policy
  3. score        frozen forwards on packed micro-batches: old policy, pi_SFT (reward and KL
                  reference in one), pi_PT, critic values (or the reward model)
  4. advantages   coherent reward (+ no-EOS policy, whitening, clipping), KL shaping, estimator
  5. update       PPO epochs over minibatches (critic only during its warm-up)
  6. log, evaluate, save (resumable; SIGINT/SIGTERM save first)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from .. import dist
from ..advantages import RunningMoments, baseline_advantages, explained_variance, resolve_whiten
from ..batching import dummy_batch, rank_microbatches
from ..config import RLStageConfig
from ..data import prompt_tokens, read_records
from ..engine import backward_together, build_engine, release_frozen, save_engines
from ..errors import ConfigError, DataError, SamplerError, TrainingError
from ..evaluation import greedy_metrics, load_eval_set
from ..experience import (
    Experience,
    build_sequences,
    flat,
    packed_label_logprobs,
    packed_response_values,
    packed_sequence_scores,
    response_mask,
    score_tokens,
)
from ..generation import Generations, sample_seed
from ..metrics import device_memory
from ..modeling import load_critic, load_model
from ..ops import (
    coherent_gae,
    kl_estimate,
    masked_whiten,
    ppo_loss,
    value_loss,
)
from ..rollout import HFRolloutEngine, SamplingParams, gather_generations, lockstep_calls, my_prompts, start_sampler
from ..state import resumable, rng_state, set_rng_state
from ..world import verifier_for
from .base import Stage, check_data_spec, check_optim
from .lm import EpochSampler
from .loop import Training, run_training

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


class RLModels:
    """The actor and critic (trainable, each with its engine) and the frozen models, loaded once each."""

    def __init__(self, ctx, rl: RLStageConfig, steps: int, resume_dir: str | None = None, state: dict | None = None):
        """`steps` rollout buffers; the engines' schedules count optimizer steps (optimizer_steps). `state`: an
        interrupted run's trainer state, saved in `resume_dir`."""
        cfg = ctx.cfg
        self.ctx, self.rl = ctx, rl
        frozen: dict[str, torch.nn.Module] = {}

        def frozen_model(ref: str):  # one copy per distinct model, in the run's precision
            path = ctx.model_path(ref)
            if path not in frozen:
                frozen[path] = ctx.load_frozen(ctx.stage, ref)
            return frozen[path]

        actor = load_model(resume_dir, cfg.model) if state else ctx.init_model(rl.init)
        actor_steps, critic_steps = optimizer_steps(rl, steps)
        self.actor = build_engine(ctx, actor, rl.optim, actor_steps, "actor",
                                  resume=(resume_dir, state["actor"]) if state else None)
        self.critic = None
        if rl.advantage.estimator == "gae":
            critic_path = f"{resume_dir}/critic" if state else ctx.model_path(rl.critic.init)
            self.critic = build_engine(ctx, load_critic(critic_path, cfg.model), rl.critic.optim, critic_steps,
                                       "critic", resume=(resume_dir, state["critic"]) if state else None)
        self.ref = frozen_model(rl.kl.reference or rl.reward.sft)
        self.sft = self.pt = self.reward_model = None
        if rl.reward.type == "coherent":
            self.sft, self.pt = frozen_model(rl.reward.sft), frozen_model(rl.reward.pretrained)
        else:
            self.reward_model = ctx.load_frozen(ctx.stage, rl.reward.model_path, "sequence_classification")

    def close(self) -> None:
        """Release the engines (optimizers, DeepSpeed state) and the frozen models: the stage is done."""
        for engine in (self.actor, self.critic):
            if engine is not None:
                engine.close()
        for model in {id(m): m for m in (self.ref, self.sft, self.pt, self.reward_model) if m is not None}.values():
            release_frozen(model)
        self.actor = self.critic = self.ref = self.sft = self.pt = self.reward_model = None


# ------------------------------------------------------------------------------------------------
# 3. score


def score(models: RLModels, prompt_ids: list[list[int]], gens, budget: int) -> tuple[Experience, dict]:
    """Frozen forwards over the buffer: old-policy, reference, pi_SFT / pi_PT (or reward-model) scores."""
    rl, ctx = models.rl, models.ctx
    seqs = build_sequences(prompt_ids, gens.responses)
    mask = response_mask(gens.responses)
    run = dict(data=seqs, mask=mask, budget=budget, device=ctx.device, autocast=models.actor.autocast)
    temperature = rl.rollout.temperature
    # the KL compares the sampling distributions, so pi_ref is tempered like the actor; the coherent reward
    # compares the models themselves (temperature 1): one frozen SFT forward serves both at temperature 1
    old = score_tokens(lambda b: packed_label_logprobs(models.actor.model, b, temperature), **run)
    ref = score_tokens(lambda b: packed_label_logprobs(models.ref, b, temperature), **run)
    scores = {}
    if models.sft is not None:
        scores["sft"] = ref if models.sft is models.ref and temperature == 1.0 else \
            score_tokens(lambda b: packed_label_logprobs(models.sft, b), **run)
        scores["pt"] = score_tokens(lambda b: packed_label_logprobs(models.pt, b), **run)
    else:
        scores["model"] = score_sequences(models.reward_model, seqs, budget, ctx.device, models.actor.autocast)
    values = None
    if models.critic is not None:
        values = score_tokens(lambda b: packed_response_values(models.critic.model, b), **run)
    exp = Experience(seqs, mask, np.asarray(gens.prompt_index), torch.tensor(gens.ended), old, ref, values)
    if gens.logprobs is not None:
        exp.sampler_logp = torch.zeros(mask.shape, dtype=torch.float32)
        exp.sampler_logp[mask] = torch.tensor([lp for row in gens.logprobs for lp in row], dtype=torch.float32)
    return exp, scores


@torch.no_grad()
def score_sequences(reward_model, seqs, budget, device, autocast) -> torch.Tensor:
    """The reward model's score of every sequence (each rank its share, summed over the ranks): [B]."""
    out = torch.zeros(len(seqs))
    share = rank_microbatches(seqs, np.arange(len(seqs)), budget, dist.rank(), dist.world_size())
    for batch, real in share.on_device(device):
        with autocast():
            scores = packed_sequence_scores(reward_model, batch)
        if real:
            out[torch.as_tensor(batch.seq_ids)] = scores.cpu()
    return dist.all_reduce_tensor_(out)


# ------------------------------------------------------------------------------------------------
# 4. rewards and advantages


def sequence_adjustment(rl: RLStageConfig, raw: torch.Tensor, ended: torch.Tensor,
                        moments: RunningMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_scale, seq_shift) turning the raw sequence reward R into R' = scale * R + shift: running
    whitening, and the no-EOS penalty (scale 0, shift = penalty)."""
    scale, shift = torch.ones_like(raw), torch.zeros_like(raw)
    if rl.reward.whiten:
        moments.update(raw)
        scale, shift = scale / moments.std, shift - moments.mean / moments.std
    if rl.reward.no_eos == "penalty":
        scale = torch.where(ended, scale, torch.zeros_like(scale))
        shift = torch.where(ended, shift, torch.full_like(shift, rl.reward.no_eos_penalty))
    return scale, shift


def rewards_and_advantages(rl: RLStageConfig, exp: Experience, scores: dict, moments: RunningMoments) -> dict:
    """Fill exp.rewards / advantages / returns; return the reward statistics of the buffer. Whatever the reward
    (the coherent reward from pi_SFT and pi_PT, or a reward model's score of each response), one path: per-token
    rewards (the coherent reward's log-ratio, or the score on the terminal token), then the same adjustments (no-EOS
    policy, running whitening, clipping), KL shaping and GAE or returns (one op, ops.coherent_gae), then the same
    baseline and whitening."""
    mask, r, a = exp.mask, rl.reward, rl.advantage
    kl_k1 = kl_estimate(exp.old_logp, exp.ref_logp, "k1") * mask
    kl_coef = rl.kl.coef if rl.kl.placement == "reward" else 0.0
    kl = kl_estimate(exp.old_logp, exp.ref_logp, rl.kl.estimator) * mask
    if "model" in scores:  # one number per response: no per-token log-ratio, the score is the sequence reward
        raw = scores["model"] * r.scale
        scale, shift = sequence_adjustment(rl, raw, exp.ended, moments)
        zero = torch.zeros_like(exp.old_logp)
        sft, pt, log_ratio = zero, zero, None
        # the op's terminal reward is clip(seq_scale * R + seq_shift) of its own R (0 here): the score enters as
        # the shift, adjusted as the coherent reward's R is
        shape = dict(granularity="sequence", scale=1.0, token_clip=None, length_normalize=False,
                     seq_scale=torch.zeros_like(raw), seq_shift=scale * raw + shift)
    else:
        d = (scores["sft"] - scores["pt"]) * mask
        if r.token_clip is not None:
            d = d.clamp(-r.token_clip, r.token_clip)
        length = mask.sum(-1).clamp_min(1).float()
        raw = r.scale * d.sum(-1) / (length if r.length_normalize else 1.0)
        scale, shift = sequence_adjustment(rl, raw, exp.ended, moments)
        sft, pt, log_ratio = scores["sft"], scores["pt"], d
        shape = dict(granularity=r.granularity, scale=r.scale, token_clip=r.token_clip,
                     length_normalize=r.length_normalize, seq_scale=scale, seq_shift=shift)
    exp.rewards, exp.advantages, exp.returns, final, _ = coherent_gae(
        exp.old_logp, exp.ref_logp, sft, pt, exp.values if a.estimator == "gae" else None, mask, kl_coef=kl_coef,
        kl_estimator=rl.kl.estimator, seq_clip=r.clip, gamma=a.gamma, lam=a.lam, **shape)
    if a.estimator != "gae":
        exp.advantages = baseline_advantages(a.estimator, exp.returns, mask, exp.prompt_index)
    if resolve_whiten(a.estimator, a.whiten):  # null: gae and reinforce only (advantages.py)
        exp.advantages = masked_whiten(exp.advantages, mask)
    stats = {"reward/task": final.mean(), "reward/total": exp.rewards.sum(-1).mean(),
             "reward/kl": -kl_coef * kl.sum(-1).mean(), "kl": kl_k1.sum(-1).mean(),
             "kl/estimator_mean": kl.sum() / mask.sum()}
    stats["reward/model" if log_ratio is None else "reward/coherent"] = raw.mean()
    exp.stats.update(reward=raw, log_ratio=log_ratio, kl=kl_k1.sum(-1))  # per response, for the samples table
    if log_ratio is not None:  # per-token log-ratio: hacking shows here first
        tokens = log_ratio[mask]
        q = torch.quantile(tokens, torch.tensor([0.05, 0.5, 0.95]))
        stats.update({"log_ratio/mean": tokens.mean(), "log_ratio/p05": q[0], "log_ratio/p50": q[1],
                      "log_ratio/p95": q[2]})
    if exp.values is not None:
        stats["explained_variance"] = explained_variance(exp.values, exp.returns, mask)
    return {k: float(v) for k, v in stats.items()}


def sampler_correction(rl: RLStageConfig, exp: Experience) -> dict:
    """The sampler/trainer mismatch of the buffer, per response token: log pi_old - log pi_sampler, pi_old the
    trainer's recomputation (the PPO ratio's denominator) and pi_sampler what drew the token (vLLM's processed
    log-prob: tempered, and renormalised over the nucleus when top_p < 1; async, from weights up to
    max_staleness updates older). With rollout.tis_cap, each token's advantage is weighted by
    min(pi_old / pi_sampler, cap) (truncated importance sampling): the policy-gradient term then estimates the
    gradient under pi_old from samples of pi_sampler, with bounded variance."""
    if exp.sampler_logp is None:
        return {}
    delta = (exp.old_logp - exp.sampler_logp)[exp.mask]
    ratio = delta.exp()
    stats = {"rollout/logprob_diff_mean": float(delta.abs().mean()),
             "rollout/logprob_diff_max": float(delta.abs().max()), "rollout/is_ratio_mean": float(ratio.mean())}
    cap = rl.rollout.tis_cap
    if cap is not None:
        weights = torch.zeros_like(exp.old_logp)
        weights[exp.mask] = ratio.clamp(max=cap)
        exp.advantages = exp.advantages * weights
        stats.update({"rollout/tis_weight_mean": float(ratio.clamp(max=cap).mean()),
                      "rollout/tis_capped_frac": float((ratio > cap).float().mean())})
    return stats


# ------------------------------------------------------------------------------------------------
# 5. update


def minibatch_losses(models: RLModels, exp: Experience, batch, rows: np.ndarray, n_tokens: int,
                     train_actor: bool) -> dict:
    """Forward one packed micro-batch through the actor and/or critic, compute both PPO losses in one op
    (ops.ppo_loss; ops.value_loss during the critic-only warm-up), and backpropagate them together."""
    rl, ppo, device = models.rl, models.rl.ppo, models.ctx.device
    kl_in_loss = rl.kl.placement == "loss" and rl.kl.coef > 0

    def take(x):  # the rows' response-token entries, in packed order
        return flat(x, exp.mask, rows).to(device)

    ones = torch.ones(int(exp.mask[torch.as_tensor(rows)].sum()), dtype=torch.bool, device=device)
    values = None
    if models.critic is not None:
        with models.critic.autocast():
            values = packed_response_values(models.critic.model, batch)
    critic = dict(old_values=take(exp.values), returns=take(exp.returns), value_clip=ppo.value_clip) \
        if values is not None else {}
    if train_actor:
        with models.actor.autocast():
            logp, ent = packed_label_logprobs(models.actor.model, batch, rl.rollout.temperature,
                                                 return_entropy=True)
        actor_loss, critic_loss, stats = ppo_loss(
            logp, take(exp.old_logp), take(exp.advantages), ones, clip_eps=ppo.clip_eps,
            clip_eps_high=ppo.clip_eps_high, entropy=ent, entropy_coef=ppo.entropy_coef,
            ref_logp=take(exp.ref_logp) if kl_in_loss else None, kl_coef=rl.kl.coef if kl_in_loss else 0.0,
            kl_estimator=rl.kl.estimator, dual_clip=ppo.dual_clip, values=values, normalizer=n_tokens, **critic)
    else:
        actor_loss = None
        critic_loss, stats = value_loss(values, mask=ones, normalizer=n_tokens, **critic)
    # one pass when the engines allow it: the fused op computes both gradients at once
    backward_together([(engine, loss) for engine, loss in ((models.actor, actor_loss), (models.critic, critic_loss))
                       if loss is not None])
    return stats


def dummy_losses(models: RLModels, train_actor: bool) -> None:
    """A rank with no sequences left in this minibatch: forward and backward a dummy micro-batch with weight 0
    (the collectives of ZeRO need every rank in every forward and backward)."""
    batch = dummy_batch().to(models.ctx.device)
    losses = []
    if train_actor:
        with models.actor.autocast():
            losses.append(packed_label_logprobs(models.actor.model, batch).sum() * 0.0)
    if models.critic is not None:
        with models.critic.autocast():
            losses.append(packed_response_values(models.critic.model, batch).sum() * 0.0)
    engines = [e for e in (models.actor if train_actor else None, models.critic) if e is not None]
    backward_together(list(zip(engines, losses)))


def ppo_update(models: RLModels, exp: Experience, train_actor: bool, seed: int = 0) -> dict:
    """PPO epochs over minibatches of the buffer (the same minibatches on every rank, each rank running its
    balanced share of each); token-mean losses over each minibatch, whatever the world size."""
    ppo = models.rl.ppo
    sums: dict[str, float] = {}
    n_minibatches = 0
    rng = np.random.default_rng(seed)
    imbalance = []
    for _ in range(ppo.epochs):
        order = rng.permutation(len(exp.sequences))
        for start in range(0, len(order), ppo.train_batch_size):
            ids = order[start:start + ppo.train_batch_size]
            n_tokens = int(exp.mask[torch.as_tensor(ids)].sum())
            minibatch: dict[str, float] = {}
            share = rank_microbatches(exp.sequences, ids, ppo.micro_batch_tokens, dist.rank(), dist.world_size())
            imbalance.append(share.imbalance)
            for batch in share.batches:
                if batch is None:
                    dummy_losses(models, train_actor)
                    continue
                _accumulate(minibatch, minibatch_losses(models, exp, batch.to(models.ctx.device), batch.seq_ids,
                                                        n_tokens, train_actor))
            if dist.world_size() > 1:  # token sums / n_tokens: summed over the ranks, the minibatch's
                keys = sorted(set().union(*dist.all_gather_object(sorted(minibatch))))
                minibatch = dist.all_reduce_dict({k: minibatch.get(k, 0.0) for k in keys})
            _accumulate(sums, minibatch)
            if train_actor:
                actor_ok = all(math.isfinite(minibatch.get(k, 0.0)) for k in ("pg_loss", "kl_loss", "entropy"))
                _accumulate(sums, {f"actor_{k}": v for k, v in models.actor.step(actor_ok).items()})
            if models.critic is not None:
                critic_ok = math.isfinite(minibatch.get("value_loss", 0.0))
                _accumulate(sums, {f"critic_{k}": v for k, v in models.critic.step(critic_ok).items()})
            n_minibatches += 1
    out = {k: v / max(n_minibatches, 1) for k, v in sums.items()}
    if dist.world_size() > 1:
        out["rank_imbalance"] = float(np.mean(imbalance))
    return out


def _accumulate(sums: dict, stats: dict) -> None:
    for k, v in stats.items():
        sums[k] = sums.get(k, 0.0) + float(v)


# ------------------------------------------------------------------------------------------------
# the stage


def total_rl_steps(rl: RLStageConfig, n_prompts: int) -> int:
    return rl.max_steps or max(1, math.ceil(rl.episodes * n_prompts / rl.prompts_per_step))


def optimizer_steps(rl: RLStageConfig, buffers: int) -> tuple[int, int]:
    """(actor, critic) optimizer steps over `buffers` rollout buffers: each buffer is ppo.epochs passes of
    ceil(buffer / train_batch_size) minibatches; the actor sits out the critic's warm-up buffers. The
    learning-rate schedules run over these counts."""
    per_buffer = rl.ppo.epochs * math.ceil(rl.prompts_per_step * rl.rollout.n_samples / rl.ppo.train_batch_size)
    warmup = rl.critic.warmup_buffers if rl.advantage.estimator == "gae" else 0
    return max(1, (buffers - warmup) * per_buffer), buffers * per_buffer


def stage_models(rl: RLStageConfig, name: str) -> dict[str, str]:
    """Config key -> model reference of every model the stage reads (they must share the tokenizer)."""
    refs = {f"{name}.init": rl.init, f"{name}.kl.reference": rl.kl.reference or rl.reward.sft}
    if rl.reward.type == "coherent":
        refs.update({f"{name}.reward.sft": rl.reward.sft, f"{name}.reward.pretrained": rl.reward.pretrained})
    else:
        refs[f"{name}.reward.model_path"] = rl.reward.model_path
    if rl.advantage.estimator == "gae":
        refs[f"{name}.critic.init"] = rl.critic.init
    return refs


def save_rl(ctx, name: str, models: RLModels, step: int, complete: bool, fingerprint: dict,
            extra_state: dict | None = None) -> None:
    """The actor as a Hugging Face directory, the critic in its `critic/` subdirectory, and (unfinished
    runs only) the trainer state. `fingerprint`: the stage's, taken when it started (what it trained on)."""
    info = {"stage": name, "step": step, "complete": complete, "fingerprint": fingerprint}
    engines = {"actor": models.actor}
    if models.critic is not None:
        engines["critic"] = models.critic  # saved in the critic/ subdirectory
    ctx.metrics.flush()
    save_engines(ctx.checkpoint_dir(name), engines, ctx.tokenizer(), info, None if complete else extra_state,
                 card=ctx.model_card(name, info))


@dataclass
class PendingRollout:
    """A buffer whose generation was started: its prompts, and this rank's share in flight (vllm) or done."""

    step: int
    chosen: np.ndarray  # prompt indices of the step
    prompt_ids: list[list[int]]
    mine: list[int]  # which of them this rank's sampler answers
    params: SamplingParams
    result: Future | Generations


class RLRun(Training):
    """What an RL stage carries from step to step; `state_dict` is everything a resume needs.

    Rollout with a sampler that holds its own weights (vllm): before a buffer is generated the sampler is
    brought within an allowed lag of the actor (0 on-policy; max_staleness - 1 when generated a step ahead,
    since the next update lands before that buffer trains), and every rollout.sync_check_every syncs (and after
    the first) its log-probs of a probe sequence are compared with the trainer's."""

    def __init__(self, ctx, rl: RLStageConfig, prompts: Prompts, steps: int, state: dict | None, resume_dir: str,
                 stage: str):
        self.ctx, self.rl, self.prompts, self.steps, self.stage = ctx, rl, prompts, steps, stage
        # a sampler with its own weights starts first, while its share of the device is free; then the models
        self.engine = start_sampler(ctx, rl.rollout, ctx.model_path(rl.init), f"{stage}.init ({rl.init!r})")
        self.probe = self._probe()
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
        self.log_every, self.save_every = rl.log_every, rl.save_every
        self.fingerprint: dict = {}

    # -- the stage loop's side (stages/loop.py) ----------------------------------------------------

    saves_before_a_failed_step = True  # a sampler that fails mid-step: the last complete step is saved first

    def engines(self):
        return [(engine, f"{self.stage} {what}") for engine, what in ((self.models.actor, "actor"),
                                                                      (self.models.critic, "critic"))
                if engine is not None]

    def after(self, step: int, stats: dict) -> None:
        rl = self.rl
        if rl.eval_every and step % rl.eval_every == 0 and rl.prompts.startswith("world:"):
            with self.models.actor.autocast():
                evaluate_during_training(self.ctx, self.stage, step, self.models.actor.model, self.ctx.tokenizer())

    def postfix(self, stats: dict) -> dict[str, str]:
        return {"reward": f"{stats['reward/total']:.3f}", "kl": f"{stats['kl']:.3f}",
                "acc": f"{stats.get('sample/accuracy', float('nan')):.2f}"}

    def save(self, step: int, complete: bool) -> None:
        save_rl(self.ctx, self.stage, self.models, step, complete, self.fingerprint,
                None if complete else self.state_dict(step))

    def finish(self, steps: int) -> None:
        self.save(steps, complete=True)
        self.models.close()
        log.info("%s: saved %s", self.stage, self.ctx.checkpoint_dir(self.stage))

    def _probe(self) -> list[int]:
        """The sync check's probe: two prompts of the set back to back (text the model has seen the like of)."""
        ids = self.prompts.ids
        return (ids[0] + ids[min(1, len(ids) - 1)])[:self.rl.max_prompt_len + self.rl.rollout.max_new_tokens]

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
        skip = os.environ.get("SRPPO_FAST_TEST_SKIP_SYNC_BUCKET")  # tests: a sync that loses a bucket
        error, stats = None, {}
        try:
            stats = self.engine.update_weights(self.models.actor.model, self.version,
                                               skip_bucket=int(skip) if skip and self.engine.syncs else None)
        except SamplerError as e:
            error = e
        dist.first_error(error)
        n = self.engine.syncs
        if n == 1 or (ro.sync_check_every and n % ro.sync_check_every == 0) or \
                dist.any_true(bool(self.engine.incomplete)):
            stats.update(self.verify_sync())
        return stats

    def verify_sync(self) -> dict:
        """The sampler's log-probs of the probe against the trainer's (every rank checks its own sampler)."""
        tokens = self.probe[:self.engine.max_len or len(self.probe)]
        seqs = build_sequences([tokens[:1]], [tokens[1:]])
        mask = response_mask([tokens[1:]])
        trainer = score_tokens(lambda b: packed_label_logprobs(self.models.actor.model, b), seqs, mask,
                               len(tokens), self.ctx.device, self.models.actor.autocast)[0].double()
        error, diff = None, torch.zeros(1)
        try:
            diff = (self.engine.prompt_logprobs(tokens) - trainer).abs()
        except SamplerError as e:
            error = e
        dist.first_error(error)
        exact = self.engine.dtype == torch.float32 and self.ctx.precision == "fp32"  # both sides compute in fp32
        tol = self.rl.rollout.sync_check_tol or (1e-3 if exact else 3e-2)
        mean, worst = float(diff.mean()), float(diff.max())
        bad = dist.all_reduce([mean], "max")[0]
        if not bad <= tol:
            raise SamplerError(f"weight sync check failed after sync {self.engine.syncs} (actor update "
                               f"{self.version}): the sampler's log-probs of the probe differ from the trainer's "
                               f"by {bad:.3g} nats per token on average (rollout.sync_check_tol {tol:g}), so it "
                               "serves other weights than the trainer's; stopping rather than training on "
                               "samples from them.")
        log.info("sampler weights verified after sync %d: probe |dlogp| mean %.2e, max %.2e over %d tokens",
                 self.engine.syncs, mean, worst, len(diff))
        return {"sync/check_mean": mean, "sync/check_max": worst}

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


def run_rl_stage(ctx, name: str) -> None:
    """Prompts -> models (or an interrupted run's state) -> steps 1-6 -> the final checkpoint."""
    rl: RLStageConfig = ctx.cfg.section(name)
    tok = ctx.tokenizer()
    prompts, dropped = load_prompts(rl.prompts, tok, ctx.world_dir, rl.max_prompt_len, f"{name}.prompts")
    steps = total_rl_steps(rl, len(prompts.ids))
    if rl.advantage.estimator == "gae" and rl.critic.warmup_buffers >= steps:
        raise ConfigError(f"{name}.critic.warmup_buffers ({rl.critic.warmup_buffers}) is not below the stage's "
                          f"{steps} rollout buffers: the actor would never train; lower it or raise episodes.")
    ctx.check_models(name, stage_models(rl, name))
    log.info("%s: %d prompts (%d dropped as longer than %d), %d steps of %d x %d responses", name,
             len(prompts.ids), dropped, rl.max_prompt_len, steps, rl.prompts_per_step, rl.rollout.n_samples)
    fingerprint = ctx.fingerprint(name)
    state = resumable(ctx.checkpoint_dir(name), fingerprint)
    run = RLRun(ctx, rl, prompts, steps, state, str(ctx.checkpoint_dir(name)), name)
    run.fingerprint = fingerprint
    run_training(ctx, name, run, steps, state["step"] if state is not None else 0, state is not None)


def samples_table(exp: Experience, tokenizer, questions: list[str], verifier, k: int, rng) -> list[dict]:
    """`k` responses of the buffer for reading: a quarter (at least one) of the highest rewards and as many of the
    lowest, alternating, then random others; each with its prompt, reward, per-token log-ratio summary (sum,
    largest token, its position), KL to the reference and the verifier's verdict (None without one)."""
    reward, log_ratio, kl = exp.stats["reward"], exp.stats["log_ratio"], exp.stats["kl"]
    order = torch.argsort(reward, descending=True, stable=True).tolist()
    extremes = max(1, k // 4)  # a quarter of the rows at each end (k=8: 2 highest, 2 lowest, 4 random)
    picks: dict[int, str] = {}
    for high, low in list(zip(order, reversed(order)))[:extremes]:
        for i, label in ((high, "highest"), (low, "lowest")):
            if len(picks) < k and i not in picks:
                picks[i] = label
    rest = [i for i in order if i not in picks]
    for i in rng.permutation(rest)[:max(0, k - len(picks))].tolist():
        picks[i] = "random"
    offsets, rows = exp.sequences.offsets, []
    for i, pick in picks.items():
        seq = exp.sequences.tokens[offsets[i]:offsets[i + 1]].tolist()
        n = int(exp.mask[i].sum())
        response, prompt = seq[len(seq) - n:], seq[:len(seq) - n]
        text = tokenizer.decode(response, skip_special_tokens=True)
        row = {"pick": pick, "prompt": tokenizer.decode(prompt, skip_special_tokens=False), "response": text,
               "reward": float(reward[i]), "log_ratio_sum": None, "log_ratio_max": None,
               "log_ratio_max_token": None, "log_ratio_max_pos": None, "kl": float(kl[i]),
               "correct": verifier([questions[i]], [text])["accuracy"] == 1.0 if verifier else None, "length": n,
               "ended": bool(exp.ended[i])}
        if log_ratio is not None and n:
            per_token = log_ratio[i][exp.mask[i]]
            top = int(per_token.argmax())
            row.update(log_ratio_sum=float(per_token.sum()), log_ratio_max=float(per_token[top]),
                       log_ratio_max_token=tokenizer.decode([response[top]]), log_ratio_max_pos=top)
        rows.append(row)
    return rows


def rollout_stats(exp: Experience, gens, tokenizer, questions: list[str], verifier) -> dict:
    lengths = exp.lengths.float()
    stats = {"response_length": float(lengths.mean()), "eos_rate": float(exp.ended.float().mean())}
    stats.update(verify_samples(verifier, tokenizer, questions, gens.responses, "sample/"))
    return stats


def verify_samples(verifier, tokenizer, questions: list[str], responses: list[list[int]], prefix: str) -> dict:
    """The verifier's metrics (accuracy, careful share) of sampled responses, keys prefixed; {} without one."""
    if verifier is None:
        return {}
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    return {f"{prefix}{k}": v for k, v in verifier(questions, texts).items()}


def evaluate_during_training(ctx, name: str, step: int, model, tokenizer) -> None:
    record = {"stage": name, "step": step}
    for spec in ("world:eval_id", "world:eval_ood"):
        evalset = load_eval_set(spec, tokenizer, ctx.world_dir)
        row = greedy_metrics(model, tokenizer, evalset, ctx.cfg.eval.max_new_tokens, ctx.cfg.eval.batch_size)
        record.update({f"eval/{evalset.name}/{k}": v for k, v in row.items()})
    ctx.metrics.log(record)


class RLStage(Stage):
    """On-policy RL: rollouts from the actor, a reward (the coherent reward, or a reward model's score), KL shaping,
    advantages (GAE with a critic, or a baseline), PPO updates."""

    kind = "rl"
    section_type = RLStageConfig
    profiled = True

    def validate(self, before: list[str], check_files: bool) -> None:
        rl, name = self.section, self.name
        check_data_spec(rl.prompts, f"{name}.prompts", check_files)
        self.check_model_ref(rl.init, f"{name}.init", before, check_files)
        est, n = rl.advantage.estimator, rl.rollout.n_samples
        if est in ("rloo", "grpo") and n < 2:
            raise ConfigError(f"{name}.advantage.estimator={est} compares samples of the same prompt, but "
                              f"{name}.rollout.n_samples is {n}; set n_samples >= 2 or use gae/reinforce.")
        if est == "gae":
            self.check_model_ref(rl.critic.init, f"{name}.critic.init", before, check_files)
            check_optim(rl.critic.optim, f"{name}.critic.optim")
        elif rl.critic.warmup_buffers:
            raise ConfigError(f"{name}.critic.warmup_buffers is {rl.critic.warmup_buffers} but {est} has no critic; "
                              f"set it to 0 or use advantage.estimator=gae.")
        if rl.reward.type == "model":
            if not rl.reward.model_path:
                raise ConfigError(f"{name}.reward.type is 'model' but {name}.reward.model_path is not set; give the "
                                  "reward model's directory or hub name.")
            if check_files and "/" in rl.reward.model_path and not os.path.exists(rl.reward.model_path) \
                    and rl.reward.model_path.startswith((".", "/")):
                raise ConfigError(f"{name}.reward.model_path: '{rl.reward.model_path}' does not exist.")
        else:
            self.check_model_ref(rl.reward.sft, f"{name}.reward.sft", before, check_files)
            self.check_model_ref(rl.reward.pretrained, f"{name}.reward.pretrained", before, check_files)
            if rl.reward.sft == rl.reward.pretrained:
                raise ConfigError(f"{name}.reward.sft and {name}.reward.pretrained are both '{rl.reward.sft}': the "
                                  "coherent reward log pi_SFT - log pi_PT would be 0; point them at different models.")
        if rl.kl.placement == "loss" and rl.kl.estimator == "k1" and rl.kl.coef > 0:
            raise ConfigError(f"{name}.kl.placement is 'loss' with {name}.kl.estimator 'k1': the k1 term's gradient "
                              "does not depend on pi_ref (its expectation is zero), so it would not pull the policy "
                              f"toward it; use {name}.kl.estimator=k2 or k3 in the loss, or kl.placement=reward.")
        if rl.kl.reference is not None:
            self.check_model_ref(rl.kl.reference, f"{name}.kl.reference", before, check_files)
        elif rl.reward.type == "model" and rl.kl.coef > 0 and rl.reward.sft not in before and rl.reward.sft != "base":
            self.check_model_ref(rl.reward.sft, f"{name}.reward.sft (the default KL reference)", before, check_files)
        self.check_rollout()
        buffer = rl.prompts_per_step * n
        if rl.ppo.train_batch_size > buffer:
            raise ConfigError(f"{name}.ppo.train_batch_size ({rl.ppo.train_batch_size}) is larger than the rollout "
                              f"buffer ({rl.prompts_per_step} prompts x {n} samples = {buffer}); lower it or raise "
                              "prompts_per_step.")
        longest = rl.max_prompt_len + rl.rollout.max_new_tokens
        if rl.ppo.micro_batch_tokens < longest:
            raise ConfigError(f"{name}.ppo.micro_batch_tokens ({rl.ppo.micro_batch_tokens}) is smaller than "
                              f"max_prompt_len + rollout.max_new_tokens ({longest}); raise it or shorten those.")
        if rl.max_steps is not None and est == "gae" and rl.critic.warmup_buffers >= rl.max_steps:
            raise ConfigError(f"{name}.critic.warmup_buffers ({rl.critic.warmup_buffers}) is not below max_steps "
                              f"({rl.max_steps}): the actor would never train.")
        check_optim(rl.optim, f"{name}.optim")

    def model_keys(self) -> dict[str, str]:
        return stage_models(self.section, self.name)

    def model_refs(self) -> list[str]:
        s = self.section
        refs = [s.init]
        if s.reward.type == "coherent":
            refs += [s.reward.sft, s.reward.pretrained]
        refs.append(s.kl.reference or s.reward.sft)
        if s.advantage.estimator == "gae":
            refs.append(s.critic.init)
        return list(dict.fromkeys(refs))

    def external_models(self) -> dict[str, str]:
        s = self.section
        return {f"{self.name}.reward.model_path": s.reward.model_path} if s.reward.type == "model" else {}

    def data_specs(self) -> list[str]:
        return [self.section.prompts]

    def data_checks(self) -> list[tuple[str, str, bool]]:
        return [(self.section.prompts, "prompt", False)]

    def rollout(self):
        return self.section.rollout

    def update_tokens(self) -> int:
        return self.section.ppo.micro_batch_tokens

    def memory_models(self) -> list[tuple[str, str, bool, str, list[str]]]:
        s, name = self.section, self.name
        out = [("actor", s.init, True, "causal_lm", [f"{name}.init"])]
        if s.advantage.estimator == "gae":
            out.append(("critic", s.critic.init, True, "token_classification", [f"{name}.critic.init"]))
        frozen: dict[str, tuple[str, list[str]]] = {}  # ref -> (model class, keys); one load per distinct ref
        if s.reward.type == "coherent":
            frozen.setdefault(s.reward.sft, ("causal_lm", []))[1].append(f"{name}.reward.sft")
            frozen.setdefault(s.reward.pretrained, ("causal_lm", []))[1].append(f"{name}.reward.pretrained")
        else:
            frozen.setdefault(str(s.reward.model_path), ("sequence_classification", []))[1].append(
                f"{name}.reward.model_path")
        frozen.setdefault(s.kl.reference or s.reward.sft, ("causal_lm", []))[1].append(f"{name}.kl.reference")
        return out + [(f"frozen {ref}", ref, False, kind, keys) for ref, (kind, keys) in frozen.items()]

    def plan_line(self) -> str:
        s = self.section
        reward = (f"coherent(sft={s.reward.sft}, pt={s.reward.pretrained}, {s.reward.granularity})"
                  if s.reward.type == "coherent" else f"model({s.reward.model_path})")
        length = f"max_steps={s.max_steps}" if s.max_steps else f"episodes={s.episodes:g}"
        return (f"{self.name}: actor={s.init} prompts={s.prompts} reward={reward} kl={s.kl.coef:g}({s.kl.estimator}, "
                f"in {s.kl.placement}) advantage={s.advantage.estimator} {length} buffer={s.prompts_per_step}x"
                f"{s.rollout.n_samples} train_batch={s.ppo.train_batch_size} actor_lr={s.optim.lr:g}")

    def describe(self) -> str:
        s = self.section
        if s.reward.type != "coherent":
            return f"PPO with the reward model '{s.reward.model_path}'"
        return (f"Self-Rewarding PPO: PPO with the coherent reward log pi_SFT(y|x) - log pi_PT(y|x) (pi_SFT: "
                f"`{s.reward.sft}`, pi_PT: `{s.reward.pretrained}`)")

    def card_rows(self) -> list[str]:
        return ["| critic | the value model, in `critic/` |"] if self.section.advantage.estimator == "gae" else []

    def run(self, ctx) -> None:
        run_rl_stage(ctx, self.name)
