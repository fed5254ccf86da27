"""Per-GPU memory plan of a run's stages (for --dry-run), from the same placement decisions the engines and the
model loaders take (engine/placement.py), so that what it counts is what a run allocates.

Per model, on each GPU (exact, from the architecture built on the meta device: no weights, no network):
    parameters      elements x the run's precision (bf16: 2 bytes); ceil(elements / GPUs) of every parameter
                    where ZeRO-3 shards them (trainable models; frozen ones with deepspeed.shard_frozen)
    trainable only  fp32 gradients, AdamW's two fp32 moments, and in bf16 the fp32 master weights; ZeRO-1
                    shards the master weights and moments over the GPUs, ZeRO-2 the gradients too, ZeRO-3 all
                    (the torch engine, one process, shards nothing); offloaded states count on the CPU
Per stage, the largest of its phases' transient needs (estimates, beside the models' states):
    update          one packed micro-batch's activations saved for the backward, per trainable model at
                    once: per layer and token 24 H + 8 I bytes in bf16 (measured on transformers' Llama with
                    the run's attention; twice that in fp32), or 2 H with gradient checkpointing plus one layer
                    recomputed; the fused log-prob op's logits workspace (one chunk); DeepSpeed's gradient
                    reduction bucket (ZeRO 1/2) or the gathered layers (ZeRO-3)
    generate        transformers generate's KV cache: 2 x layers x KV heads x head dim x rows x (longest prompt
                    + response) x bytes; a colocated vLLM sampler that sleeps on-policy: its
                    gpu_memory_utilization share while it generates (one that never sleeps holds it throughout)
The eval stage loads its models one at a time on rank 0: its total is the largest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..config import Config, resolved_engine
from ..stages import stage_of
from .placement import Placement, placement
from .sizes import UnknownSize, activation_bytes, hf_config_for, kv_cache_bytes, parameter_numels

GIB = 2**30
DEFAULT_GPUS = 8
DEFAULT_GPU_GIB = 80.0
DS_REDUCE_BUCKET = int(5e8)  # DeepSpeed's default reduce_bucket_size (elements)


@dataclass
class ModelPlan:
    """One model of a stage on each GPU (bytes); `error` when its size is unknown."""

    role: str  # "model", "actor", "critic", "frozen <ref>": as the stages name the models they place
    ref: str
    trainable: bool
    params: int | None = None
    param_bytes: int | None = None  # the module's parameters on one GPU
    states: dict[str, int] = field(default_factory=dict)  # trainable: gradients, optimizer, master weights
    cpu_bytes: int = 0  # offloaded states, per GPU's process
    sharded: bool = False
    serves: list[str] = field(default_factory=list)  # config keys a frozen model serves
    error: str | None = None
    sampler: bool = False  # a colocated vLLM sampler: its share of the GPU, not a model's parameters
    sampler_bytes: int = 0
    hf_config: object = field(default=None, repr=False)

    @property
    def gpu_bytes(self) -> int | None:
        if self.sampler:
            return self.sampler_bytes
        if self.param_bytes is None:
            return None
        return self.param_bytes + sum(self.states.values())


@dataclass
class StagePlan:
    name: str
    models: list[ModelPlan]
    gpu_gib: float  # the per-GPU budget
    transient: dict[str, int] = field(default_factory=dict)  # phase -> its largest transient need (estimate)
    one_at_a_time: bool = False  # eval: one model loaded at a time

    @property
    def states_bytes(self) -> int | None:
        sizes = [m.gpu_bytes for m in self.models]
        if any(s is None for s in sizes):
            return None
        return max(sizes, default=0) if self.one_at_a_time else sum(sizes)

    @property
    def total_bytes(self) -> int | None:
        states = self.states_bytes
        return None if states is None else states + max(self.transient.values(), default=0)

    @property
    def fits(self) -> bool | None:
        total = self.total_bytes
        return None if total is None else total <= self.gpu_gib * GIB


# ---------------------------------------------------------------------------------------------
# the world the plan is for


def plan_world() -> tuple[int, int, str | None]:
    """(GPUs in all, nodes, a note when the count is our default): WORLD_SIZE when launched, else the visible
    GPUs, else 8 GPUs on one node."""
    world = os.environ.get("WORLD_SIZE")
    if world and world.isdigit() and int(world) > 0:
        gpus = int(world)
        local = os.environ.get("LOCAL_WORLD_SIZE")
        nodes = gpus // int(local) if local and local.isdigit() and int(local) > 0 and gpus % int(local) == 0 else 1
        return gpus, max(nodes, 1), None
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count(), 1, None
    return DEFAULT_GPUS, 1, (f"planned for {DEFAULT_GPUS} GPUs (set WORLD_SIZE or launch with torchrun to plan for "
                             "another count)")


def plan_gpu_gib(cfg: Config) -> float:
    """runtime.gpu_memory_gib, or the smallest visible GPU's memory, or 80 GiB."""
    if cfg.runtime.gpu_memory_gib > 0:
        return float(cfg.runtime.gpu_memory_gib)
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return min(torch.cuda.get_device_properties(i).total_memory
                   for i in range(torch.cuda.device_count())) / GIB
    return DEFAULT_GPU_GIB


def plan_precision(cfg: Config) -> str:
    """runtime.precision as a GPU run resolves it (the plan is for GPUs: 'auto' is bf16 there)."""
    p = cfg.runtime.precision
    if p != "auto":
        return p
    if cfg.runtime.device == "cpu":
        return "fp32"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16"


def plan_engine(cfg: Config, num_gpus: int) -> str:
    """runtime.engine for a run on `num_gpus` processes ('auto': deepspeed beyond one)."""
    if cfg.runtime.engine != "auto":
        return cfg.runtime.engine
    return "deepspeed" if num_gpus > 1 else resolved_engine(cfg)


def model_placement(cfg: Config, trainable: bool, num_gpus: int) -> Placement:
    ds = cfg.deepspeed
    return placement(plan_precision(cfg), plan_engine(cfg, num_gpus), trainable=trainable, zero_stage=ds.zero_stage,
                     shard_frozen=ds.shard_frozen)


# ---------------------------------------------------------------------------------------------
# architectures and parameter counts


# ---------------------------------------------------------------------------------------------
# transient needs


# ---------------------------------------------------------------------------------------------
# the plan


def _plan_model(cfg: Config, role: str, ref: str, trainable: bool, kind: str, keys: list[str], num_gpus: int,
                whole_on_rank0: bool, cache: dict) -> ModelPlan:
    m = ModelPlan(role, ref, trainable, serves=keys)
    # eval runs on rank 0 alone with whole models
    place = model_placement(cfg, trainable, 1 if whole_on_rank0 else num_gpus)
    if whole_on_rank0:
        place = placement(plan_precision(cfg), "torch", trainable=False)
    try:
        m.hf_config = hf_config_for(cfg, ref)
        key = (m.hf_config.to_json_string(use_diff=False), kind)
        if key not in cache:
            cache[key] = parameter_numels(m.hf_config, kind)
        numels, largest = cache[key]
    except UnknownSize as e:
        m.error = str(e)
        return m
    except Exception as e:  # noqa: BLE001 - the dry run never fails on the plan
        m.error = f"size not computed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        return m
    world = 1 if whole_on_rank0 else num_gpus
    m.params, m.sharded = sum(numels), place.sharded
    m.param_bytes = place.param_bytes(numels, world)
    ds = cfg.deepspeed
    if place.sharded and ds.offload_param:
        m.cpu_bytes += m.param_bytes
        m.param_bytes = 0
    if trainable:
        states = place.state_bytes(m.params, world)
        if place.zero_stage is not None and ds.offload_optimizer and place.zero_stage > 0:
            for k in ("optimizer", "master weights"):
                m.cpu_bytes += states.pop(k, 0)
        m.states = states
        m.largest_layer = largest
    return m


def lora_base_ref(cfg: Config, ref: str) -> tuple[str, bool]:
    """(the full weights `ref` sits on under model.lora, whether `ref` is an adapter): a stage of this run that
    trains adapters sits on its init's base; an adapter directory on the model its adapter_config.json names."""
    if cfg.is_stage(ref):
        stage = stage_of(cfg, ref)
        if stage.trains_adapters():
            return lora_base_ref(cfg, stage.section.init)[0], True
        return ref, False
    from ..adapters import adapter_base, is_adapter_dir

    if ref != "base" and is_adapter_dir(ref):
        return adapter_base(ref), True
    return ref, False


def _lora_models(cfg: Config, specs: list, num_gpus: int, cache: dict) -> list[ModelPlan]:
    """A stage that trains adapters (roles.py): each distinct base once (frozen; sharded under ZeRO-3, where the
    critic's engine shards a copy of its own), each trainable role's adapter with its gradients and optimizer
    states (the critic's with its value head), each frozen role's adapter; a reward model as it is."""
    from .sizes import adapter_numels

    lora = cfg.model.lora
    trainable_place = model_placement(cfg, True, num_gpus)
    zero3 = trainable_place.sharded
    bases: dict[str, ModelPlan] = {}
    adapters: list[ModelPlan] = []
    for role, ref, trainable, kind, keys in specs:
        if kind == "sequence_classification":
            adapters.append(_plan_model(cfg, role, ref, trainable, kind, keys, num_gpus, False, cache))
            continue
        base_ref, has_adapter = lora_base_ref(cfg, ref)
        copy = " (the critic's own copy)" if zero3 and role == "critic" else ""
        base = bases.get(base_ref + copy)
        if base is None:
            base = _plan_model(cfg, f"frozen base {base_ref}{copy}", base_ref, False, "causal_lm", [], num_gpus,
                               False, cache)
            if base.params is not None and zero3 and not base.sharded:  # owned by a ZeRO-3 engine: sharded
                base.sharded = True
                base.param_bytes = trainable_place.param_bytes([base.params], num_gpus)
            bases[base_ref + copy] = base
        base.serves += keys
        if not trainable and not has_adapter:
            continue  # adapters off: the base itself (pi_PT)
        m = ModelPlan(f"{role} adapter" + (" + value head" if kind == "token_classification" else "")
                      if trainable else f"frozen adapter {ref}", ref, trainable, serves=keys)
        if base.hf_config is None:
            m.error = base.error
            adapters.append(m)
            continue
        arch = base.hf_config.to_json_string(use_diff=False)
        key = (arch, "lora", lora.rank, tuple(lora.target_modules))  # one meta build per architecture, as for models
        if key not in cache:
            cache[key] = adapter_numels(base.hf_config, lora.rank, list(lora.target_modules))
        numels = list(cache[key])
        if kind == "token_classification":
            numels.append(base.hf_config.hidden_size)
        place = trainable_place if trainable else model_placement(cfg, False, num_gpus)
        m.hf_config, m.params, m.sharded = base.hf_config, sum(numels), place.sharded
        m.param_bytes = place.param_bytes(numels, num_gpus)
        if trainable:
            m.states = place.state_bytes(m.params, num_gpus)
            m.largest_layer = cache[(arch, "causal_lm")][1]  # the base's largest layer (ZeRO-3 gathers it)
        adapters.append(m)
    return list(bases.values()) + adapters


def plan_memory(cfg: Config, num_gpus: int, num_nodes: int, gpu_gib: float) -> list[StagePlan]:
    """The per-GPU memory plan of each stage of `cfg` on `num_gpus` GPUs over `num_nodes` nodes of `gpu_gib`
    each. Never raises for a model: its ModelPlan carries the error instead."""
    cache: dict = {}
    plans = []
    for name in cfg.stages:
        stage = stage_of(cfg, name)
        whole = stage.whole_models_on_rank0
        specs = stage.memory_models()
        if stage.trains_adapters():
            models = _lora_models(cfg, specs, num_gpus, cache)
        else:
            models = [_plan_model(cfg, *spec, num_gpus, whole, cache) for spec in specs]
        plan = StagePlan(name, models, gpu_gib, one_at_a_time=whole)
        plan.transient = _transient(cfg, name, models, num_gpus, gpu_gib)
        ro = stage.rollout()
        if ro is not None and ro.engine == "vllm":
            models.append(_sampler_plan(cfg, name, gpu_gib))
        plans.append(plan)
    return plans


def _transient(cfg: Config, name: str, models: list[ModelPlan], num_gpus: int, gpu_gib: float) -> dict[str, int]:
    """The stage's phases' transient needs beyond the models' states (estimates)."""
    stage = stage_of(cfg, name)
    size = 2 if plan_precision(cfg) == "bf16" else 4
    known = [m for m in models if m.hf_config is not None]
    if not known:
        return {}
    out: dict[str, int] = {}
    gc = cfg.model.gradient_checkpointing
    tokens = stage.update_tokens()
    if tokens is not None:
        update = sum(activation_bytes(m.hf_config, tokens, size, gc, lm_head=not m.role.startswith("critic"))
                     for m in known if m.trainable)
        ds = cfg.deepspeed
        engine = plan_engine(cfg, num_gpus)
        for m in known:
            if not m.trainable or engine != "deepspeed":
                continue
            if ds.zero_stage in (1, 2):  # the gradient reduction bucket, in the accumulation dtype (fp32)
                bucket = int(ds.config.get("zero_optimization", {}).get("reduce_bucket_size", DS_REDUCE_BUCKET))
                update += 4 * min(bucket, m.params)
            elif ds.zero_stage == 3:  # the layer being computed and the one prefetched, gathered whole
                update += 2 * getattr(m, "largest_layer", 0) * size
        out["update"] = update
    shape = stage.generate_shape()  # transformers generate on the stage's own model (the actor, or eval's largest)
    if shape is not None:
        model = max(known, key=lambda m: m.params or 0) if stage.whole_models_on_rank0 else \
            next((m for m in known if m.trainable), None)
        if model is not None:
            out["generate"] = kv_cache_bytes(model.hf_config, shape[0], shape[1], size)
    ro = stage.rollout()
    if ro is not None and ro.engine == "vllm" and ro.vllm.sleep and not ro.async_:
        # a sleeping sampler holds nothing during scoring and the update, and its whole share while it generates,
        # beside every model the stage keeps on the device
        out["sampler"] = int(ro.vllm.gpu_memory_utilization * gpu_gib * GIB)
    return out


def _sampler_plan(cfg: Config, name: str, gpu_gib: float) -> ModelPlan:
    """A colocated vLLM sampler takes gpu_memory_utilization of each GPU (its weights and KV cache) while it
    generates; asleep during an on-policy update it holds none of it then."""
    ro = stage_of(cfg, name).rollout()
    share = ro.vllm.gpu_memory_utilization
    asleep = ro.vllm.sleep and not ro.async_
    role = (f"vllm sampler (asleep during scoring and the update; {share:g} of the GPU while generating)" if asleep
            else f"vllm sampler ({share:g} of the GPU, " + ("overlapping the update" if ro.async_ else "awake: "
                                                            "vllm.sleep is false") + ")")
    return ModelPlan(role, cfg.section(name).init, False, params=0, serves=[f"{name}.rollout"], sampler=True,
                     sampler_bytes=0 if asleep else int(share * gpu_gib * GIB))


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def describe_memory(cfg: Config) -> str:
    """The memory plan block of --dry-run (one line on failure: never raises)."""
    try:
        gpus, nodes, note = plan_world()
        if cfg.runtime.engine == "torch":  # one process: one GPU
            gpus, nodes, note = 1, 1, None
        gpu_gib = plan_gpu_gib(cfg)
        plans = plan_memory(cfg, gpus, nodes, gpu_gib)
    except Exception as e:  # noqa: BLE001
        return f"memory plan: not computed ({type(e).__name__}: {e})"
    ds = cfg.deepspeed
    precision = plan_precision(cfg)
    engine = plan_engine(cfg, gpus)
    where = (f"{gpus} GPUs" if gpus > 1 else "1 GPU") + (f" on {nodes} nodes" if nodes > 1 else "")
    how = f"deepspeed ZeRO-{ds.zero_stage}" if engine == "deepspeed" else "torch engine, one process"
    offload = [k for k in ("offload_optimizer", "offload_param") if getattr(ds, k)] if engine == "deepspeed" else []
    lines = [f"memory plan ({how}, {where} x {gpu_gib:g} GiB, {precision}"
             + (f", {' + '.join(offload)}" if offload else "") + "):"]
    if note:
        lines.append(f"  ({note})")
    master = " + fp32 master weights" if precision == "bf16" else ""
    lines.append(f"  (per model: parameters in {precision}; trainable models also fp32 gradients + AdamW moments"
                 f"{master}, sharded as ZeRO-{ds.zero_stage if engine == 'deepspeed' else 0} shards them; per stage, "
                 "the largest phase's activations or KV cache, estimated)")
    for plan in plans:
        lines.append(f"  {plan.name}:" + (" (rank 0, one model at a time)" if plan.one_at_a_time else ""))
        for m in plan.models:
            if m.error:
                lines.append(f"    {m.role}{'' if m.role.endswith(m.ref) else f' ({m.ref})'}: {m.error}")
                continue
            if m.sampler:
                lines.append(f"    {m.role}: {_gib(m.gpu_bytes)} per GPU beside scoring and the update")
                continue
            where_params = f"sharded over {gpus} GPUs" if m.sharded else "whole on each GPU"
            if m.trainable:
                parts = ", ".join(f"{k} {_gib(v)}" for k, v in m.states.items())
                cpu = f"; CPU {_gib(m.cpu_bytes)}" if m.cpu_bytes else ""
                lines.append(f"    {m.role} (trainable, {m.ref}, {_billions(m.params)} params, {where_params}): "
                             f"{_gib(m.gpu_bytes)} per GPU = parameters {_gib(m.param_bytes)}, {parts}{cpu}")
            else:
                lines.append(f"    {m.role} ({_billions(m.params)} params, {precision}, {where_params}; serves "
                             f"{', '.join(m.serves)}): {_gib(m.gpu_bytes)} per GPU")
        for phase, need in plan.transient.items():
            what = {"update": "activations of a micro-batch (and DeepSpeed's buffers)",
                    "generate": "transformers generate's KV cache",
                    "sampler": "the vLLM sampler while it generates"}[phase]
            lines.append(f"    {phase}: {what}: {_gib(need)} (estimate)")
        total = plan.total_bytes
        known = plan.states_bytes
        if total is None:
            have = sum(m.gpu_bytes for m in plan.models if m.gpu_bytes is not None)
            if have > gpu_gib * GIB:
                lines.append(f"    stage total at least {_gib(have)} per GPU of {gpu_gib:g} GiB (a model's size is "
                             "unknown): DOES NOT FIT: raise deepspeed.zero_stage, offload (deepspeed.offload_optimizer "
                             "/ offload_param) or use more GPUs")
            else:
                lines.append(f"    stage total: unknown (a model's size is unknown; the others need {_gib(have)} "
                             "per GPU)")
        elif plan.fits:
            lines.append(f"    stage total {_gib(total)} per GPU of {gpu_gib:g} GiB (models {_gib(known)}): fits")
        else:
            lines.append(f"    stage total {_gib(total)} per GPU of {gpu_gib:g} GiB (models {_gib(known)}): DOES NOT "
                         f"FIT: raise deepspeed.zero_stage, offload (deepspeed.offload_optimizer / offload_param), "
                         "lower micro_batch_tokens, turn on model.gradient_checkpointing or use more GPUs")
    return "\n".join(lines)
