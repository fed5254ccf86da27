"""Sizes for the memory plan (memory.py), computed before any weight exists: a model's HF config from a model
reference, its parameter counts (built on the meta device), and the activation and KV-cache bytes of a micro-batch."""

from __future__ import annotations

import os

import torch

from ..config import Config, ModelConfig, is_gguf

LOGITS_CHUNK_BYTES = 256 << 20  # ops.linear_logprobs.DEFAULT_CHUNK_BYTES
LAYER_BYTES_PER_TOKEN = (24, 8)  # bf16 activations saved per layer and token: 24 H + 8 I (measured: memory.py)


class UnknownSize(Exception):
    pass


def _arch_given(model: ModelConfig) -> bool:
    """model.arch set by the config (not the default tiny scratch architecture) and naming a model_type."""
    return "model_type" in model.arch and model.arch != ModelConfig().arch


def _config_from_arch(arch: dict):
    from transformers import AutoConfig

    arch = dict(arch)
    model_type = arch.pop("model_type")
    return AutoConfig.for_model(model_type, **arch)


def hf_config_for(cfg: Config, ref: str):
    """The HF config of the model named `ref` ('base', a stage of this run, a directory or a hub name).
    Stages are fine-tunes of model.base: its architecture. Raises UnknownSize."""
    from transformers import AutoConfig

    trust = cfg.model.trust_remote_code
    if ref == "base" or cfg.is_stage(ref):
        base = cfg.model.base
        if base == "scratch":
            from ..modeling import check_arch

            arch = dict(cfg.model.arch)
            vocab = arch.pop("vocab_size", None)
            if vocab is None:
                vocab = _scratch_vocab(cfg)
            return check_arch(ModelConfig(**{**cfg.model.__dict__, "arch": arch}), int(vocab))
        path = base
    else:
        path = ref
    from ..modeling import gguf_config

    if is_gguf(path):
        return gguf_config(path)
    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust)
    try:  # a hub name: the local cache only (no network for a dry run)
        return AutoConfig.from_pretrained(path, trust_remote_code=trust, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (OSError, ValueError, ...)
        pass
    if path == cfg.model.base and _arch_given(cfg.model):
        return _config_from_arch(cfg.model.arch)
    if path == cfg.model.base:
        raise UnknownSize("unknown size: give model.arch")
    raise UnknownSize(f"unknown size: '{path}' is not a local directory nor in the hub cache")


def _scratch_vocab(cfg: Config) -> int:
    """A scratch model is sized to its tokenizer: the run's (the world's, once built in output_dir), else the world's
    target vocabulary (a small corpus can give a BPE fewer tokens than that), else 512."""
    spec = cfg.model.tokenizer
    if spec in ("auto", "world"):
        spec = os.path.join(cfg.output_dir, "world", "tokenizer")
        if not os.path.isdir(spec):
            return cfg.world.vocab_size
    try:
        from ..modeling import load_tokenizer

        return len(load_tokenizer(spec, trust_remote_code=cfg.model.trust_remote_code, convert=False))
    except Exception:  # noqa: BLE001 - the dry run never fails on the plan
        return cfg.world.vocab_size if cfg.model.tokenizer in ("auto", "world") else 512


def parameter_numels(hf_config, kind: str = "causal_lm") -> tuple[list[int], int]:
    """(every distinct parameter's element count, the largest layer's own parameters) of the architecture,
    built on the meta device. kind: causal_lm, token_classification (a critic: one output per token) or
    sequence_classification."""
    import copy

    import transformers

    hf_config = copy.deepcopy(hf_config)
    auto = {"causal_lm": transformers.AutoModelForCausalLM,
            "token_classification": transformers.AutoModelForTokenClassification,
            "sequence_classification": transformers.AutoModelForSequenceClassification}[kind]
    if kind != "causal_lm":
        hf_config.num_labels = 1
    with torch.device("meta"):
        model = auto.from_config(hf_config)
    numels = [p.numel() for p in model.parameters()]  # parameters() yields tied weights once
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return numels, int(largest)


def adapter_numels(hf_config, rank: int, targets: list[str]) -> list[int]:
    """The element counts of a rank-`rank` LoRA adapter's matrices on `targets` (model.lora.target_modules) of the
    architecture: A (r x in) and B (out x r) per adapted linear layer."""
    import transformers

    from ..adapters import linear_names, resolve_targets

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    names = linear_names(model)
    chosen = resolve_targets(names, targets)
    modules = dict(model.named_modules())
    out = []
    for n in names:
        if any(n == t or n.endswith("." + t) for t in chosen):
            out += [rank * modules[n].in_features, modules[n].out_features * rank]
    return out


def count_params(hf_config, kind: str = "causal_lm") -> tuple[int, int]:
    """(total parameters, largest layer's own parameters) of the architecture."""
    numels, largest = parameter_numels(hf_config, kind)
    return sum(numels), largest


def _dims(hf_config) -> dict[str, int]:
    text = getattr(hf_config, "text_config", None) or hf_config
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    return {"hidden": hidden, "inter": int(getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden),
            "layers": int(getattr(text, "num_hidden_layers", 1) or 1), "vocab": int(text.vocab_size),
            "kv": int(getattr(text, "num_key_value_heads", None) or heads) * head_dim}


def activation_bytes(hf_config, tokens: int, param_size: int, gradient_checkpointing: bool,
                     lm_head: bool = True) -> int:
    """What one packed micro-batch of `tokens` tokens keeps for its backward (estimate; see the module doc)."""
    d = _dims(hf_config)
    per_layer = LAYER_BYTES_PER_TOKEN[0] * d["hidden"] + LAYER_BYTES_PER_TOKEN[1] * d["inter"]
    scale = param_size / 2  # measured in bf16
    if gradient_checkpointing:
        body = tokens * (d["layers"] * 2 * d["hidden"] + per_layer) * scale
    else:
        body = tokens * d["layers"] * per_layer * scale
    head = min(LOGITS_CHUNK_BYTES, tokens * d["vocab"] * param_size) + tokens * 2 * d["hidden"] if lm_head else 0
    return int(body + head)


def kv_cache_bytes(hf_config, rows: int, length: int, param_size: int) -> int:
    d = _dims(hf_config)
    return 2 * d["layers"] * d["kv"] * rows * length * param_size
