"""The RL stage's models and the frozen forwards over a rollout buffer (step 3, score)."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from .. import dist
from ..batching import rank_microbatches
from ..config import RLStageConfig
from ..engine import build_engine, release_frozen
from ..experience import (
    Experience,
    build_sequences,
    packed_label_logprobs,
    packed_response_values,
    packed_sequence_scores,
    response_mask,
    score_tokens,
)
from ..roles import critic_model, frozen_model, trainable_model, uses_lora

log = logging.getLogger("srppo_fast")


class RLModels:
    """The actor and critic (trainable, each with its engine) and the frozen models, loaded once each."""

    def __init__(self, ctx, rl: RLStageConfig, steps: int, resume_dir: str | None = None, state: dict | None = None):
        """`steps` rollout buffers; the engines' schedules count optimizer steps (optimizer_steps). `state`: an
        interrupted run's trainer state, saved in `resume_dir`."""
        self.ctx, self.rl = ctx, rl
        frozen_models: dict[str, torch.nn.Module] = {}
        self.lora = lora = uses_lora(ctx)  # every role an adapter on one shared base (roles.py)

        def frozen(ref: str):  # one per distinct model, in the run's precision
            path = ctx.model_path(ref)
            if path not in frozen_models:
                frozen_models[path] = frozen_model(ctx, ref, lora)
            return frozen_models[path]

        if lora:  # the frozen adapters join the base before an engine (ZeRO-3) shards it
            self._frozen_roles(frozen)
        actor = trainable_model(ctx, rl.init, "actor", resume_dir if state else None)
        actor_steps, critic_steps = optimizer_steps(rl, steps)
        self.actor = build_engine(ctx, actor, rl.optim, actor_steps, "actor",
                                  resume=(resume_dir, state["actor"]) if state else None)
        self.critic = None
        if rl.advantage.estimator == "gae":
            critic = critic_model(ctx, rl.critic.init, f"{resume_dir}/critic" if state else None)
            self.critic = build_engine(ctx, critic, rl.critic.optim, critic_steps, "critic",
                                       resume=(resume_dir, state["critic"]) if state else None)
        if not lora:
            self._frozen_roles(frozen)

    def _frozen_roles(self, frozen) -> None:
        rl, ctx = self.rl, self.ctx
        self.ref = frozen(rl.kl.reference or rl.reward.sft)
        self.sft = self.pt = self.reward_model = None
        if rl.reward.type == "coherent":
            self.sft, self.pt = frozen(rl.reward.sft), frozen(rl.reward.pretrained)
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


def total_rl_steps(rl: RLStageConfig, n_prompts: int) -> int:
    return rl.max_steps or max(1, math.ceil(rl.episodes * n_prompts / rl.prompts_per_step))


def optimizer_steps(rl: RLStageConfig, buffers: int) -> tuple[int, int]:
    """(actor, critic) optimizer steps over `buffers` rollout buffers: each buffer is ppo.epochs passes of
    ceil(buffer / train_batch_size) minibatches; the actor sits out the critic's warm-up buffers. The
    learning-rate schedules run over these counts."""
    per_buffer = rl.ppo.epochs * math.ceil(rl.prompts_per_step * rl.rollout.n_samples / rl.ppo.train_batch_size)
    warmup = rl.critic.warmup_buffers if rl.advantage.estimator == "gae" else 0
    return max(1, (buffers - warmup) * per_buffer), buffers * per_buffer
