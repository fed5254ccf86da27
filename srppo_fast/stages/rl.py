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

import logging
import os

from ..config import RLStageConfig
from ..errors import ConfigError
from ..rl.models import total_rl_steps
from ..rl.run import RLRun, load_prompts
from ..rl.samples import evaluate_during_training
from ..state import resumable
from .base import Stage, check_data_spec, check_optim
from .loop import Training, run_training

log = logging.getLogger("srppo_fast")


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


class RLTraining(Training):
    """An RL stage in the stage loop: RLRun's steps, its resumable state and final checkpoint."""

    saves_before_a_failed_step = True  # a sampler that fails mid-step: the last complete step is saved first

    def __init__(self, run: RLRun, fingerprint: dict):
        self.run, self.fingerprint = run, fingerprint
        self.ctx, self.name, self.rl = run.ctx, run.stage, run.rl
        self.log_every, self.save_every = self.rl.log_every, self.rl.save_every

    def engines(self):
        models = self.run.models
        return [(engine, f"{self.name} {what}") for engine, what in ((models.actor, "actor"), (models.critic, "critic"))
                if engine is not None]

    def step(self, step: int) -> dict:
        return self.run.step(step)

    def after(self, step: int, stats: dict) -> None:
        rl = self.rl
        if rl.eval_every and step % rl.eval_every == 0 and rl.prompts.startswith("world:"):
            actor = self.run.models.actor
            with actor.autocast():
                evaluate_during_training(self.ctx, self.name, step, actor.model, self.ctx.tokenizer())

    def postfix(self, stats: dict) -> dict[str, str]:
        return {"reward": f"{stats['reward/total']:.3f}", "kl": f"{stats['kl']:.3f}",
                "acc": f"{stats.get('sample/accuracy', float('nan')):.2f}"}

    def save(self, step: int, complete: bool) -> None:
        models = self.run.models  # the actor's directory, the critic in its critic/ subdirectory
        engines = {"actor": models.actor, **({"critic": models.critic} if models.critic is not None else {})}
        self.ctx.save_checkpoint(self.name, engines, step, complete, self.fingerprint,
                                 None if complete else self.run.state_dict(step))

    def close(self) -> None:
        self.run.close()

    def finish(self, steps: int) -> None:
        self.save(steps, complete=True)
        self.run.models.close()


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
    run_training(ctx, name, RLTraining(run, fingerprint), steps, state["step"] if state is not None else 0,
                 state is not None)


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
        if self.section.advantage.estimator != "gae":
            return []
        if self.trains_adapters():
            return ["| critic | its LoRA adapter and value head (`value_head.safetensors`), in `critic/` |"]
        return ["| critic | the value model, in `critic/` |"]

    def run(self, ctx) -> None:
        run_rl_stage(ctx, self.name)
