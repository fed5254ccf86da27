"""The run configuration's schema: nested dataclasses, each field with its help text (`metadata["help"]`) and
bounds. Loading (YAML, overrides, validation) is in config_load.py; the stage kinds' own sections in sections.py."""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml

from .sections import (
    WORLD_SPLITS,
    AdvantageConfig,
    CriticConfig,
    EvalConfig,
    KLConfig,
    LMStageConfig,
    OptimConfig,
    PPOConfig,
    RewardConfig,
    RLStageConfig,
    RolloutConfig,
    SpinStageConfig,
    VLLMConfig,
    opt,
    stage_section,
    sub,
)

__all__ = ["WORLD_SPLITS", "AdvantageConfig", "Config", "CriticConfig", "DeepSpeedConfig", "EvalConfig", "KLConfig",
           "LMStageConfig", "LoggingConfig", "LoraConfig", "ModelConfig", "OptimConfig", "PPOConfig", "RewardConfig",
           "RLStageConfig", "RolloutConfig", "RuntimeConfig", "SpinStageConfig", "VLLMConfig", "WandbConfig",
           "WorldConfig", "STAGE_TYPES", "opt", "sub", "stage_section", "to_dict", "shown", "is_gguf",
           "resolved_precision", "resolved_engine", "config_key", "stage_label"]


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
class LoraConfig:
    """LoRA adapters as the model roles (peft): one frozen base serves pi_PT (adapters off), pi_SFT (the SFT stage's
    adapter), the actor (a trainable adapter started from it) and the critic (its own adapter + a value head)."""

    rank: int = opt(16, "Rank r of every adapter's A (r x in) and B (out x r) matrices.", gt=0)
    alpha: float = opt(32.0, "Scale numerator: an adapter adds (alpha / rank) * B A x to the layer's output.", gt=0)
    dropout: float = opt(0.0, "Dropout on an adapter's input while training (0 keeps on-policy ratios exactly 1 "
                         "before the first update).", ge=0, lt=1)
    target_modules: list = opt(["all-linear"], "Which linear layers get adapters: module names (suffixes such as "
                               "q_proj, v_proj) or 'all-linear' (every linear layer but the output head).")


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
    lora: LoraConfig | None = opt(None, "LoRA adapters instead of full weights (a mapping of the fields below; "
                                        "null: off). The stages that adapt a trained model (sft, sft_extended, "
                                        "spin, srppo, ppo_rm) train adapters on one shared frozen base; `pretrain` "
                                        "trains full weights. Needs peft: pip install 'srppo-fast[lora]'.")


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
class WandbConfig:
    """Weights & Biases (logging.backends: [..., wandb]): one W&B run per stage, the stages of a run in one group,
    the resolved config attached."""

    mode: Literal["offline", "online"] = opt("offline", "'offline' writes OUTPUT_DIR/wandb/ only (upload it later with "
                                             "`wandb sync`); 'online' streams to the W&B server (needs `wandb login`).")
    project: str = opt("srppo-fast", "W&B project.")
    entity: str | None = opt(None, "W&B entity (user or team); default: the logged-in user's.")
    group: str | None = opt(None, "W&B group holding the stages' runs; default: the output_dir's name.")
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
    """A whole run: the stages to run, in order, and one section per stage type. A config may add sections of its
    own names (`srppo_b1: {kind: srppo, kl: {coef: 1.0}}`): each starts as a copy of the config's section of that
    type (`srppo`: its defaults and what the config sets there), changes what it gives, and runs where `stages`
    lists its name."""

    output_dir: str = opt("runs/default", "Where the run writes config.yaml, metrics.jsonl and checkpoints/.")
    seed: int = opt(0, "Seed for model initialisation, data order and sampling.", ge=0, le=2**32 - 1)
    stages: list = opt(["pretrain", "sft"], "Stages to run, in order: stage types (pretrain, sft, sft_extended, "
                       "spin, srppo, ppo_rm, eval) or the names of sections that declare one (`kind: srppo`).")
    world: WorldConfig = sub(WorldConfig, "The embedded task world.")
    model: ModelConfig = sub(ModelConfig, "Base model and tokenizer.")
    runtime: RuntimeConfig = sub(RuntimeConfig, "Device, precision, threads, engine.")
    deepspeed: DeepSpeedConfig = sub(DeepSpeedConfig, "The DeepSpeed engine's ZeRO settings.")
    pretrain: LMStageConfig = stage_section(LMStageConfig, "Pretraining the base (causal LM on all tokens).", "PT",
                                            data="world:corpus", loss_on="all", epochs=3.0, batch_size=64,
                                            micro_batch_tokens=4096, max_seq_len=256,
                                            optim=OptimConfig(lr=3e-3, warmup_ratio=0.05, weight_decay=0.01))
    sft: LMStageConfig = stage_section(LMStageConfig, "Supervised fine-tuning on demonstrations (loss on responses).",
                                       "SFT", data="world:demos", init="pretrain", loss_on="response", epochs=2.0,
                                       batch_size=16, micro_batch_tokens=2048, max_seq_len=256,
                                       optim=OptimConfig(lr=1e-4))
    sft_extended: LMStageConfig = stage_section(
        LMStageConfig, "SFT (extended): the SFT recipe run longer (the paper: 6 epochs), a baseline.", "SFT (extended)",
        data="world:demos", init="pretrain", loss_on="response", epochs=6.0, batch_size=16, micro_batch_tokens=2048,
        max_seq_len=256, optim=OptimConfig(lr=1e-4))
    srppo: RLStageConfig = stage_section(RLStageConfig, "SRPPO: PPO with the coherent reward.", "SRPPO")
    ppo_rm: RLStageConfig = stage_section(RLStageConfig, "Baseline: PPO with an external reward model.", "PPO-RM",
                                          reward=RewardConfig(type="model"))
    spin: SpinStageConfig = stage_section(SpinStageConfig, "Baseline: self-play fine-tuning (SPIN) on the "
                                          "demonstrations.", "SPIN")
    eval: EvalConfig = stage_section(EvalConfig, "Evaluation table of every model of the run.", "eval",
                                     makes_model=False)
    logging: LoggingConfig = sub(LoggingConfig, "Metrics backends (jsonl, TensorBoard, W&B) and sample tables.")

    def __post_init__(self) -> None:
        # a section of the config's own name -> (its type: a stage type or a kind, its section, label, makes a model)
        self.named: dict[str, tuple[str, Any, str, bool]] = {}

    # the stages' sections, by the names `stages` lists

    def stage_type(self, name: str) -> str:
        """The stage type (pretrain, sft, ..., eval; or a kind without one) a stage section is: its name or `kind:`."""
        return self.named[name][0] if name in self.named else name

    def section(self, name: str) -> Any:
        """The config section of the stage called `name` (a stage type's own, or a named copy)."""
        if name in self.named:
            return self.named[name][1]
        if name not in STAGE_TYPES:
            raise KeyError(name)
        return getattr(self, name)

    def is_stage(self, name: str) -> bool:
        """Whether `name` names a stage section of this config (listed in `stages` or not)."""
        return name in STAGE_TYPES or name in self.named

    def makes_model(self, name: str) -> bool:
        """Whether the stage `name` leaves a model other stages may read (every stage type but eval)."""
        if name in self.named:
            return self.named[name][3]
        return name in STAGE_TYPES and STAGE_TYPES[name]["makes_model"]

    def trains_adapters(self, name: str) -> bool:
        """Under model.lora the stage `name` trains LoRA adapters on a frozen base (roles.py): every stage that trains
        a model, except one that starts from a 'scratch' base (there is nothing to adapt: it trains full weights)."""
        if self.model.lora is None or not self.makes_model(name):
            return False
        return not (self.section(name).init == "base" and self.model.base == "scratch")

    def model_stages(self) -> list[str]:
        """Every model-making stage section of this config: the stage types', then the named ones."""
        return [n for n in [*STAGE_TYPES, *self.named] if self.makes_model(n)]

    def label(self, name: str) -> str:
        """How tables and model cards name a model: the stage type's label (SFT, SRPPO), with a named stage's own
        name beside it; 'base' and paths as they are."""
        if not self.is_stage(name):
            return name
        if name in self.named:
            return f"{self.named[name][2]} ({name})"
        return STAGE_TYPES[name]["label"]


# stage type -> its field's metadata (label, makes_model, help): the presets `Config` declares with stage_section
STAGE_TYPES = {f.name: dict(f.metadata) for f in dataclasses.fields(Config) if f.metadata.get("stage")}


def stage_label(name: str) -> str:
    """A stage type's label (eval.json's keys in benchmarks, without a config); other names as they are."""
    return STAGE_TYPES[name]["label"] if name in STAGE_TYPES else name


_SHOWN = reprlib.Repr()


_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxlevel = 60, 60, 6, 6, 3


def shown(value: Any) -> str:
    """A value as an error message shows it: bounded in length and depth, however large or deep the value (a YAML
    alias bomb is a few nodes that expand to billions)."""
    return _SHOWN.repr(value)


def to_dict(obj: Any) -> Any:
    """Plain dict/list view of a config, for YAML dumps and checkpoints."""
    if dataclasses.is_dataclass(obj):
        out = {config_key(f.name): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        for name, (kind, section, *_) in getattr(obj, "named", {}).items():  # a Config's named stages
            out[name] = {"kind": kind, **to_dict(section)}
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def config_key(field_name: str) -> str:
    """A field named after a Python keyword carries a trailing underscore (`async_`); its key does not."""
    return field_name[:-1] if field_name.endswith("_") else field_name


WHEEL_PREFIX = "wheel:"  # a model shipped as a .gguf file inside an installed Python distribution


def is_gguf(ref: str) -> bool:
    """A model reference naming a GGUF file: a path ending in .gguf, or wheel:DIST (modeling.hf_source)."""
    return ref.startswith(WHEEL_PREFIX) or ref.lower().endswith(".gguf")


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


# ---------------------------------------------------------------------------------------------
# the reference (`srppo-fast config`, docs/config.md)


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


def config_reference(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows for every field, recursively; used for docs/config.md and `srppo-fast config`."""
    rows = []
    hints = typing.get_type_hints(cls)
    default_obj = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{config_key(f.name)}"
        tp = hints[f.name]
        value = getattr(default_obj, f.name)
        optional = optional_section(tp)
        if optional is not None:  # off unless given: its fields' defaults are the class's
            rows.append((key, "section or null", "null", f.metadata.get("help", "")))
            rows += [(k, t, _fmt(_get_path(optional(), k[len(key) + 1:])), h)
                     for k, t, _, h in config_reference(optional, key + ".")]
        elif dataclasses.is_dataclass(tp):
            rows.append((key, "section", "", f.metadata.get("help", "")))
            for sub_key, sub_tp, sub_default, sub_help in config_reference(tp, key + "."):
                # section defaults may differ from the class's own (e.g. pretrain vs sft); inside a section that
                # is off by default (model.lora) the row keeps its class's default
                sub_value = _get_path(value, sub_key[len(key) + 1:])
                rows.append((sub_key, sub_tp, sub_default if sub_value is _OFF else _fmt(sub_value), sub_help))
        else:
            rows.append((key, _type_name(tp), _fmt(value), f.metadata.get("help", "")))
    return rows


def optional_section(tp: Any) -> type | None:
    """The section class of a field typed `Section | None` (a section that is off unless given), else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


_OFF = object()  # a path through a section that is off (None)


def _get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if obj is None:
            return _OFF
        obj = getattr(obj, part) if hasattr(obj, part) else getattr(obj, part + "_")
    return obj


def _fmt(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return ""
    return yaml.safe_dump(to_dict(value), default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
