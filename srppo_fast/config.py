"""Typed run configuration: YAML + dotted `key=value` overrides -> nested dataclasses.

Every field carries its help text (``metadata["help"]``); `srppo-fast config` prints the reference.
Unknown keys, wrong types, out-of-range values, missing files and contradicting options raise
`ConfigError` with one sentence naming the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError

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

    seed: int = opt(0, "Seed of the world generator (tasks, personas, splits).")
    num_corpus_docs: int = opt(14000, "Pretraining documents (worksheets of 1-3 solved problems).", ge=1)
    careful_fraction: float = opt(0.3, "Fraction of corpus worksheets written by the careful persona "
                                  "(step-by-step, always right); the rest are hasty (answer only, often wrong).",
                                  ge=0, le=1)
    hasty_accuracy: float = opt(0.5, "Probability that a hasty answer in the corpus is correct.", ge=0, le=1)
    num_demos: int = opt(64, "Demonstrations (careful solutions of in-domain tasks) for SFT.", ge=1)
    num_demos_heldout: int = opt(200, "Held-out demonstrations: the SFT loss is evaluated on them.", ge=1)
    num_prompts: int = opt(4000, "Extra prompts without responses (in- and out-of-domain tasks) for RL.", ge=1)
    num_eval: int = opt(300, "Prompts in each evaluation split (eval_id, eval_ood).", ge=1)
    vocab_size: int = opt(384, "Vocabulary size of the BPE tokenizer trained on the corpus.", ge=64)


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
        "auto", "Compute precision: 'bf16' autocast, or 'fp32'; 'auto' = bf16 on CUDA with bf16 support, else fp32. "
        "Weights and optimiser state stay fp32.")
    num_threads: int = opt(0, "torch CPU threads; 0 keeps torch's default.", ge=0)
    progress: bool = opt(True, "Show a progress bar with tokens/s and ETA.")


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
    shuffle: bool = opt(True, "Shuffle the examples every epoch (seeded).")


@dataclass
class Config:
    """A whole run: the stages to run, in order, and one section per stage."""

    output_dir: str = opt("runs/default", "Where the run writes config.yaml, metrics.jsonl and checkpoints/.")
    seed: int = opt(0, "Seed for model initialisation, data order and sampling.")
    stages: list = opt(["pretrain", "sft"], "Stages to run, in order. Known: pretrain, sft.")
    world: WorldConfig = sub(WorldConfig, "The embedded task world.")
    model: ModelConfig = sub(ModelConfig, "Base model and tokenizer.")
    runtime: RuntimeConfig = sub(RuntimeConfig, "Device, precision, threads.")
    pretrain: LMStageConfig = sub(LMStageConfig, "Pretraining the base (causal LM on all tokens).",
                                  data="world:corpus", loss_on="all", epochs=3.0, batch_size=64,
                                  micro_batch_tokens=4096, max_seq_len=256,
                                  optim=OptimConfig(lr=3e-3, warmup_ratio=0.05, weight_decay=0.01))
    sft: LMStageConfig = sub(LMStageConfig, "Supervised fine-tuning on demonstrations (loss on responses).",
                             data="world:demos", eval_data="world:demos_heldout", init="pretrain",
                             loss_on="response", epochs=2.0, batch_size=16, micro_batch_tokens=2048,
                             max_seq_len=256, optim=OptimConfig(lr=1e-4))


STAGE_SECTIONS = {"pretrain": "pretrain", "sft": "sft"}

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
        raise ConfigError(f"{key}: {value!r} is not allowed; use {_type_name(tp)}.")
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of its fields, got {value!r}.")
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
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
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
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}).")


def _check_bounds(f: dataclasses.Field, value: Any, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    m = f.metadata
    for bound, ok, word in (("gt", lambda v, b: v > b, "greater than"), ("ge", lambda v, b: v >= b, "at least"),
                            ("lt", lambda v, b: v < b, "less than"), ("le", lambda v, b: v <= b, "at most")):
        b = m.get(bound)
        if b is not None and not ok(value, b):
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {word} {b:g}.")


def build(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a plain dict on top of `base` (default: the class defaults),
    rejecting unknown keys and wrong types. Sections merge, so a partial section keeps its defaults."""
    obj = copy.deepcopy(base) if base is not None else cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else \
                f"known keys here: {', '.join(fields)}."
            raise ConfigError(f"unknown config key '{where}': {hint} (see `srppo-fast config` for the reference)")
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            setattr(obj, name, build(tp, value, key, base=getattr(obj, name)))
        else:
            value = _convert(tp, value, key)
            _check_bounds(fields[name], value, key)
            setattr(obj, name, value)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain dict/list view of a config, for YAML dumps and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
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
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config "
                              "(e.g. configs/quickstart.yaml).")
        with open(path, encoding="utf-8") as fh:
            try:
                raw = yaml.safe_load(fh) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(f"config file '{path}' is not valid YAML{where}: "
                                  f"{getattr(e, 'problem', None) or e}; fix the syntax there.") from None
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
    if not spec:
        raise ConfigError(f"{key} is empty; give a JSONL file, a local dataset directory or world:<split>.")
    if check_files and not os.path.exists(spec):
        raise ConfigError(f"{key}: '{spec}' does not exist; fix the path, or use an embedded split such as "
                          "world:demos.")


def validate(cfg: Config, *, check_files: bool = True) -> None:
    """Cross-field checks: the options that contradict each other, and the files that must exist."""
    known = list(STAGE_SECTIONS)
    seen: list[str] = []
    for name in cfg.stages:
        if not isinstance(name, str) or name not in STAGE_SECTIONS:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known stages: {', '.join(known)}."
            raise ConfigError(f"stages: unknown stage {name!r}; {hint}")
        if name in seen:
            raise ConfigError(f"stages: '{name}' is listed twice; list each stage once.")
        seen.append(name)
    if not cfg.stages:
        raise ConfigError("stages is empty; list at least one stage, e.g. stages=[pretrain,sft].")

    for i, name in enumerate(cfg.stages):
        section: LMStageConfig = getattr(cfg, STAGE_SECTIONS[name])
        _check_data_spec(section.data, f"{name}.data", check_files)
        if section.eval_data is not None:
            _check_data_spec(section.eval_data, f"{name}.eval_data", check_files)
        if section.init != "base" and section.init not in cfg.stages[:i]:
            ckpt = os.path.join(cfg.output_dir, "checkpoints", section.init)
            if not (check_files and os.path.isdir(ckpt)):
                raise ConfigError(
                    f"{name}.init is '{section.init}', which does not run before '{name}' and has no checkpoint "
                    f"in {ckpt}; set {name}.init=base or list '{section.init}' before '{name}' in stages.")
        if section.micro_batch_tokens < section.max_seq_len:
            raise ConfigError(
                f"{name}.micro_batch_tokens ({section.micro_batch_tokens}) is smaller than {name}.max_seq_len "
                f"({section.max_seq_len}), so a long sequence could not fit a micro-batch; raise "
                f"micro_batch_tokens or lower max_seq_len.")
        betas = section.optim.betas
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"{name}.optim.betas must be two numbers in [0, 1), got {betas!r}.")

    if cfg.model.base == "scratch" and "model_type" not in cfg.model.arch:
        raise ConfigError("model.arch needs a model_type (e.g. llama) to build a 'scratch' model.")
    if cfg.model.tokenizer == "world" and cfg.model.base != "scratch":
        raise ConfigError(f"model.tokenizer is 'world' but model.base '{cfg.model.base}' is a pretrained model with "
                          "its own vocabulary; set model.tokenizer=auto.")
    if cfg.runtime.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("runtime.device is 'cuda' but no CUDA device is visible; set runtime.device=auto "
                              "or cpu.")


def config_reference(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows for every field, recursively; used for the README and `srppo-fast config`."""
    rows = []
    hints = typing.get_type_hints(cls)
    default_obj = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
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
        obj = getattr(obj, part)
    return obj


def _fmt(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return ""
    return yaml.safe_dump(to_dict(value), default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
