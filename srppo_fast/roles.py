"""The models a stage trains and reads, as full weights or (model.lora) as LoRA roles on one shared base.

Every stage asks here for its trainable model (`trainable_model`), its critic (`critic_model`) and its frozen
models (`frozen_model`); this module alone decides whether that is a full copy (modeling.py, engine) or a role on a
shared base (lora.py). Under LoRA a model reference resolves to (the full weights it sits on, its adapter):

    'base', a directory of full weights     (that model, no adapter)
    a LoRA stage of this run, an adapter    (the base its adapter_config.json names, that adapter)

and every reference of a stage that sits on the same full weights shares one frozen module: pi_PT, pi_SFT, the
actor and the critic of SRPPO are one base with three adapters. A stage whose init is 'scratch' trains full weights
(there is nothing to adapt: `pretrain`)."""

from __future__ import annotations

import logging
import os
import re

import torch

from .adapters import (
    adapter_base,
    is_adapter_dir,
    linear_names,
    merge_adapter_into,
    read_adapter_state,
    read_value_head,
    resolve_targets,
)
from .engine.placement import cast_parameters_
from .lora import Resolved, SharedBase, peft_config, read_adapter_config, value_head
from .modeling import build_scratch_model, load_critic, load_model, num_parameters

log = logging.getLogger("srppo_fast")


def resolve(ctx, ref: str) -> Resolved:
    """(the full weights, the adapter) of model reference `ref`. An adapter stage of this run sits on its init's
    weights in this run (so a copied or moved output directory resolves within itself); an adapter directory from
    elsewhere on the model its adapter_config.json names."""

    path = ctx.model_path(ref)
    if path == "scratch" or not is_adapter_dir(path):
        return Resolved(path, None)
    if ctx.cfg.is_stage(ref):
        return Resolved(resolve(ctx, ctx.cfg.section(ref).init).base, path)
    return Resolved(adapter_base(path), path)


def load_merged(ctx, ref: str, dtype: torch.dtype) -> torch.nn.Module:
    """The whole model `ref` names, as one plain module (eval): its weights, with its adapter merged in if it has
    one (a private copy)."""
    r = resolve(ctx, ref)
    model = load_model(r.base, ctx.cfg.model, dtype=dtype)
    return merge_adapter_into(model, r.adapter) if r.adapter is not None else model


def uses_lora(ctx) -> bool:
    """The running stage trains adapters (Config.trains_adapters: model.lora is set and it adapts a trained model)."""
    return ctx.cfg.trains_adapters(ctx.stage)


def _zero3(ctx) -> bool:
    return ctx.placement(trainable=True).sharded


def shared_base(ctx, spec: str, key: str = "") -> SharedBase:
    """The stage's one frozen copy of the full weights `spec`, in the run's precision on its device (`key`: another
    copy; under ZeRO-3 the critic's engine shards its own)."""
    if spec + key not in ctx.bases:
        dtype = ctx.placement(trainable=False).param_dtype
        if spec == "scratch":
            model = cast_parameters_(build_scratch_model(ctx.cfg.model, ctx.tokenizer(), ctx.cfg.seed), dtype)
        else:
            model = load_model(spec, ctx.cfg.model, dtype=dtype)
        model = model.to(ctx.device).eval()
        ctx.bases[spec + key] = SharedBase(model, _label(spec))
        ctx.track(ctx.stage, f"frozen base {spec}{key}", model)
        log.info("shared base %s%s: %s, %.2fM parameters (frozen, %s)", spec, key, type(model).__name__,
                 num_parameters(model) / 1e6, str(dtype).removeprefix("torch."))
    return ctx.bases[spec + key]


def _label(spec: str) -> str:
    """How an adapter names its base: an absolute path for a local directory, the spec itself otherwise."""
    return os.path.abspath(spec) if os.path.isdir(spec) else spec


def _adapter_name(ref: str) -> str:
    return "a_" + re.sub(r"\W", "_", ref)


def _new_adapter_config(ctx, base: SharedBase):
    lora = ctx.cfg.model.lora
    targets = resolve_targets(linear_names(base.model), list(lora.target_modules))
    return peft_config(lora.rank, lora.alpha, lora.dropout, targets)


def _trainable_adapter(ctx, init: str, role: str, resume_dir: str | None, key: str = "") -> tuple[SharedBase, str]:
    """Adapter `role` (trainable, fp32: the engine keeps its masters) on init's base: the saved one of an
    interrupted run (`resume_dir`), else a copy of init's adapter, else a new one (B = 0: the role starts as
    init's model exactly)."""
    r = resolve(ctx, init)
    base = shared_base(ctx, r.base, key)
    source = resume_dir if resume_dir is not None else r.adapter
    config = read_adapter_config(source) if source is not None else _new_adapter_config(ctx, base)
    state = read_adapter_state(source) if source is not None else None
    base.add(role, config, seed=ctx.cfg.seed, dtype=torch.float32, state=state)
    for _, p in base.params(role):
        p.requires_grad_(True)
    return base, role


def trainable_model(ctx, init: str, role: str = "model", resume_dir: str | None = None) -> torch.nn.Module:
    """The model a stage trains, from `init` (or from an interrupted run's checkpoint `resume_dir`): full weights
    in fp32 (the engine casts and keeps masters), or under LoRA adapter `role` on the shared base."""
    if not uses_lora(ctx):
        return load_model(resume_dir, ctx.cfg.model) if resume_dir is not None else ctx.init_model(init)
    base, name = _trainable_adapter(ctx, init, role, resume_dir)
    return _logged(ctx, base.view(name, owner=_zero3(ctx)))


def _logged(ctx, view):
    n = sum(p.numel() for p in view.own_parameters())
    log.info("%s: LoRA adapter '%s' on %s: %.3fM trainable parameters (%.2f%% of the base)", ctx.stage, view.adapter,
             view.shared.label, n / 1e6, 100 * n / max(1, view.shared.base_numel()))
    return view


def critic_model(ctx, init: str, resume_dir: str | None = None) -> torch.nn.Module:
    """The value model: a language model with a scalar head. Under LoRA, adapter 'critic' (from init's adapter, or
    new) on the actor's shared base, with its own head; a critic whose init sits on other weights than the actor's
    gets its own base."""
    if not uses_lora(ctx):
        return load_critic(resume_dir if resume_dir is not None else ctx.model_path(init), ctx.cfg.model)
    # under ZeRO-3 one engine shards a base: the critic's engine gets its own (sharded over the ranks too)
    base, name = _trainable_adapter(ctx, init, "critic", resume_dir, key=" (critic)" if _zero3(ctx) else "")
    saved = read_value_head(resume_dir) if resume_dir is not None else None
    head = value_head(base.model.config.hidden_size, saved).to(ctx.device)
    return _logged(ctx, base.view(name, head, owner=_zero3(ctx)))


def frozen_model(ctx, ref: str, lora: bool) -> torch.nn.Module:
    """A model that only runs forwards: a full copy (ctx.load_frozen), or under LoRA (`lora`: the stage trains
    adapters) a frozen role on the shared base its reference sits on: adapters off, or its adapter (loaded once).
    Under LoRA these come before the trainable roles' engines (ZeRO-3 shards the adapters present then)."""
    if not lora:
        return ctx.load_frozen(ctx.stage, ref)
    r = resolve(ctx, ref)
    base = shared_base(ctx, r.base)
    if r.adapter is None:
        return base.view(None)
    name = _adapter_name(ref)
    if name not in base.configs:
        base.add(name, read_adapter_config(r.adapter), seed=ctx.cfg.seed,
                 dtype=ctx.placement(trainable=False).param_dtype, state=read_adapter_state(r.adapter))
    return base.view(name)


def sampler_path(ctx, ref: str) -> str:
    """The full-weights directory a sampler starts from for the model `ref`: under LoRA its base (the first sync
    sends the merged role before anything is sampled)."""
    return resolve(ctx, ref).base if ctx.cfg.model.lora is not None else ctx.model_path(ref)
