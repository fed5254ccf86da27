"""LoRA adapters on disk and on an architecture, without peft: peft's adapter directory (adapter_config.json,
adapter_model.safetensors; our critic's value_head.safetensors), what an adapter sits on, merging one into a model's
own weights (W + (alpha / r) B A in fp32, into new tensors), and which linear layers of a model adapters may target.
lora.py builds on these for the roles on a shared base."""

from __future__ import annotations

import json
import os

import torch

from .errors import ConfigError

PEFT_PREFIX = "base_model.model."  # peft's key prefix for a PeftModel around a causal LM
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VALUE_HEAD = "value_head.safetensors"
ALL_LINEAR = "all-linear"


def linear_names(model: torch.nn.Module) -> list[str]:
    """The module names of every linear layer an adapter may sit on (not the output head, not a value head); on a
    model that already carries adapters, the adapted layers by their own names (not peft's inner modules)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, m in model.named_modules():
        parts = name.split(".")
        if not isinstance(m, torch.nn.Linear) or m is head or any(p.startswith("lora_") for p in parts):
            continue
        if parts[-1] == "base_layer":  # peft's wrapper holds the original layer under this name
            parts = parts[:-1]
        if parts[-1] not in ("score", "lm_head"):
            names.append(".".join(parts))
    return names


def resolve_targets(names: list[str], targets: list[str], key: str = "model.lora.target_modules") -> list[str]:
    """The target_modules to give peft: 'all-linear' becomes every linear layer's last name (q_proj, ...); named
    targets must each match a linear layer of the model (its full name, or its last name components)."""
    if not targets:
        raise ConfigError(f"{key} is empty; name the layers to adapt (e.g. [q_proj, v_proj]) or use [all-linear].")
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            raise ConfigError(f"{key}: 'all-linear' already names every linear layer; give it alone.")
        return sorted({n.split(".")[-1] for n in names})
    for t in targets:
        if not isinstance(t, str) or not any(n == t or n.endswith("." + t) for n in names):
            known = ", ".join(sorted({n.split(".")[-1] for n in names}))
            raise ConfigError(f"{key}: the model has no linear layer named {t!r}; its linear layers are {known} "
                              "(or use all-linear).")
    return list(targets)


def model_linear_names(hf_config) -> list[str]:
    """linear_names of the model a transformers config describes, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return linear_names(model)


def is_adapter_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_json(path: str) -> dict:
    try:
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"'{path}': its {ADAPTER_CONFIG} could not be read ({e}).") from None


def adapter_base(path: str) -> str:
    """The full weights an adapter directory sits on (its adapter_config.json's base_model_name_or_path)."""
    base = adapter_json(path).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"'{path}' is a LoRA adapter that does not name the model it sits on "
                          f"(base_model_name_or_path in {ADAPTER_CONFIG}); set it to that model's directory.")
    if base.startswith(("/", ".")) and not os.path.exists(base):
        raise ConfigError(f"'{path}' is a LoRA adapter on '{base}', which does not exist (moved or deleted?); "
                          f"restore it, or set base_model_name_or_path in {path}/{ADAPTER_CONFIG} to where it is now.")
    return base


@torch.no_grad()
def merge_adapter_into(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Add the adapter saved in `path` into `model`'s own weights (a private copy: never a shared base), computing
    W + s B A in fp32; s = alpha / r (alpha / sqrt(r) with rsLoRA). No peft needed."""
    config = adapter_json(path)
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("fan_in_fan_out"):
        raise ConfigError(f"'{path}': adapters with rank_pattern, alpha_pattern or fan_in_fan_out are not supported.")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / (r ** 0.5 if config.get("use_rslora") else r)
    state = read_adapter_state(path)
    params = dict(model.named_parameters())
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        weight = params.get(module + ".weight")
        if weight is None:
            raise ConfigError(f"'{path}': the adapter names {module}, which the model it is loaded on does not have.")
        weight.data = merged_weight(weight, a, state[key.replace(".lora_A.", ".lora_B.")], scale)
    return model


@torch.no_grad()
def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A, computed in fp32 into a new tensor of W's dtype (W itself is never written)."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


def read_adapter_state(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, ADAPTER_WEIGHTS))


def read_value_head(path: str) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    file = os.path.join(path, VALUE_HEAD)
    return load_file(file) if os.path.isfile(file) else None
