"""Per-GPU memory plan of a run's models under DeepSpeed ZeRO (for --dry-run).

Trainable models (the LM stages' model, the RL actor and critic) are estimated with DeepSpeed's own ZeRO
estimators (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`): 16-bit
parameters plus fp32 master weights, gradients and Adam states. Frozen models (pi_SFT, pi_PT, the KL reference,
a reward model) only run forwards: their parameter bytes, divided by the GPUs when ZeRO-3 shards them
(deepspeed.shard_frozen), else a whole copy per GPU. Model states only: activations and the KV cache are not
included. Parameter counts come from the architecture built on the meta device (no weights, no network).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..config import STAGE_TYPES, Config, ModelConfig, is_gguf

GIB = 2**30
DEFAULT_GPUS = 8
DEFAULT_GPU_GIB = 80.0


@dataclass
class ModelPlan:
    """One model of a stage: its size and what it needs on each GPU (bytes); `error` when unknown."""

    role: str  # "model", "actor", "critic", "frozen <ref>"
    ref: str
    trainable: bool
    params: int | None = None
    largest_layer_params: int | None = None
    gpu_bytes: int | None = None
    cpu_bytes: int | None = None  # per node (trainable models: DeepSpeed's estimate)
    sharded: bool = False
    serves: list[str] = field(default_factory=list)  # config keys a frozen model serves
    error: str | None = None
    sampler: bool = False  # a colocated vLLM sampler: its share of the GPU, not a model's parameters


@dataclass
class StagePlan:
    name: str
    models: list[ModelPlan]
    gpu_gib: float  # the per-GPU budget
    skipped: str | None = None  # why the stage is not planned (eval)

    @property
    def total_bytes(self) -> int | None:
        if any(m.gpu_bytes is None for m in self.models):
            return None
        return sum(m.gpu_bytes for m in self.models)

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
    p = cfg.runtime.precision
    if p == "bf16":
        return "bf16"
    if p == "auto" and cfg.runtime.device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


# ---------------------------------------------------------------------------------------------
# architectures and parameter counts


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
    if ref == "base" or ref in STAGE_TYPES:
        base = cfg.model.base
        if base == "scratch":
            from ..modeling import check_arch

            arch = dict(cfg.model.arch)
            vocab = arch.pop("vocab_size", None)
            if vocab is None:
                vocab = cfg.world.vocab_size if cfg.model.tokenizer in ("auto", "world") else 512
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


def count_params(hf_config, kind: str = "causal_lm") -> tuple[int, int]:
    """(total parameters, largest layer's own parameters) of the architecture, built on the meta device.
    kind: causal_lm, token_classification (a critic: one output per token) or sequence_classification."""
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
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return int(total), int(largest)


# ---------------------------------------------------------------------------------------------
# the plan


def _stage_models(cfg: Config, name: str) -> list[tuple[str, str, bool, str, list[str]]]:
    """(role, ref, trainable, kind, config keys served) of each model a stage holds."""
    s = getattr(cfg, name)
    if STAGE_TYPES[name] in ("lm", "spin"):  # SPIN's reference pi_t is the model itself at the iteration's start
        return [("model", s.init, True, "causal_lm", [f"{name}.init"])]
    out = [("actor", s.init, True, "causal_lm", [f"{name}.init"])]
    if s.advantage.estimator == "gae":
        out.append(("critic", s.critic.init, True, "token_classification", [f"{name}.critic.init"]))
    frozen: dict[str, tuple[str, list[str]]] = {}  # ref -> (kind, keys); one load per distinct ref

    def add(ref: str, kind: str, key: str) -> None:
        frozen.setdefault(ref, (kind, []))[1].append(key)

    if s.reward.type == "coherent":
        add(s.reward.sft, "causal_lm", f"{name}.reward.sft")
        add(s.reward.pretrained, "causal_lm", f"{name}.reward.pretrained")
    else:
        add(str(s.reward.model_path), "sequence_classification", f"{name}.reward.model_path")
    add(s.kl.reference or s.reward.sft, "causal_lm", f"{name}.kl.reference")
    for ref, (kind, keys) in frozen.items():
        out.append((f"frozen {ref}", ref, False, kind, keys))
    return out


def plan_memory(cfg: Config, num_gpus: int, num_nodes: int, gpu_gib: float) -> list[StagePlan]:
    """The per-GPU memory plan of each stage of `cfg` on `num_gpus` GPUs over `num_nodes` nodes of `gpu_gib`
    each. Never raises for a model: its ModelPlan carries the error instead."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    ds = cfg.deepspeed
    per_node = max(num_gpus // max(num_nodes, 1), 1)
    bytes_per_param = 2 if plan_precision(cfg) == "bf16" else 4
    counts: dict[tuple[str, str], tuple[int, int]] = {}
    plans = []
    for name in cfg.stages:
        if STAGE_TYPES[name] == "eval":
            plans.append(StagePlan(name, [], gpu_gib, skipped="runs on rank 0, not planned"))
            continue
        models = []
        for role, ref, trainable, kind, keys in _stage_models(cfg, name):
            m = ModelPlan(role, ref, trainable, serves=keys)
            try:
                hf_config = hf_config_for(cfg, ref)
                key = (hf_config.to_json_string(use_diff=False), kind)
                if key not in counts:
                    counts[key] = count_params(hf_config, kind)
                m.params, m.largest_layer_params = counts[key]
                if trainable:
                    if ds.zero_stage == 3:
                        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                            m.params, m.largest_layer_params, num_gpus_per_node=per_node, num_nodes=num_nodes,
                            cpu_offload=ds.offload_optimizer, cpu_offload_params=ds.offload_param,
                            zero_init=False, additional_buffer_factor=1.5)
                    else:  # ZeRO 0 replicates everything: the ZeRO-2 estimate on one GPU
                        gpus = per_node if ds.zero_stage > 0 else 1
                        cpu, gpu = estimate_zero2_model_states_mem_needs(
                            m.params, num_gpus_per_node=gpus, num_nodes=num_nodes if ds.zero_stage > 0 else 1,
                            cpu_offload=ds.offload_optimizer and ds.zero_stage > 0, additional_buffer_factor=1.5)
                    m.gpu_bytes, m.cpu_bytes = int(gpu), int(cpu)
                else:
                    m.sharded = ds.zero_stage == 3 and ds.shard_frozen
                    whole = m.params * bytes_per_param
                    m.gpu_bytes = -(-whole // num_gpus) if m.sharded else whole
            except UnknownSize as e:
                m.error = str(e)
            except Exception as e:  # noqa: BLE001 - the dry run never fails on the plan
                m.error = f"size not computed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            models.append(m)
        if STAGE_TYPES[name] in ("rl", "spin") and getattr(cfg, name).rollout.engine == "vllm":
            models.append(_sampler_plan(cfg, name, gpu_gib))
        plans.append(StagePlan(name, models, gpu_gib))
    return plans


def _sampler_plan(cfg: Config, name: str, gpu_gib: float) -> ModelPlan:
    """A colocated vLLM sampler takes gpu_memory_utilization of each GPU (its weights and KV cache) while it
    generates; asleep during an on-policy update it holds none of it then."""
    ro = getattr(cfg, name).rollout
    share = ro.vllm.gpu_memory_utilization
    asleep = ro.vllm.sleep and not ro.async_
    role = (f"vllm sampler (asleep during the update; {share:g} of the GPU while generating)" if asleep else
            f"vllm sampler ({share:g} of the GPU, " + ("overlapping the update" if ro.async_ else "awake: vllm.sleep "
                                                        "is false") + ")")
    return ModelPlan(role, getattr(cfg, name).init, False, gpu_bytes=0 if asleep else int(share * gpu_gib * GIB),
                     params=0, serves=[f"{name}.rollout"], sampler=True)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def describe_memory(cfg: Config) -> str:
    """The memory plan block of --dry-run (one line on failure: never raises)."""
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001
        return ("memory plan: not computed (DeepSpeed is not installed; its ZeRO estimators make the plan: "
                "pip install deepspeed)")
    try:
        gpus, nodes, note = plan_world()
        gpu_gib = plan_gpu_gib(cfg)
        plans = plan_memory(cfg, gpus, nodes, gpu_gib)
    except Exception as e:  # noqa: BLE001
        return f"memory plan: not computed ({type(e).__name__}: {e})"
    ds = cfg.deepspeed
    precision = plan_precision(cfg)
    where = f"{gpus} GPUs" + (f" on {nodes} nodes" if nodes > 1 else "")
    offload = [k for k in ("offload_optimizer", "offload_param") if getattr(ds, k)]
    lines = [f"memory plan (DeepSpeed ZeRO-{ds.zero_stage} estimators, {where} x {gpu_gib:g} GiB, {precision}"
             + (f", {' + '.join(offload)}" if offload else "")
             + "; model states only: activations and KV cache not included):"]
    if note:
        lines.append(f"  ({note})")
    estimator = "estimate_zero3_model_states_mem_needs" if ds.zero_stage == 3 else \
        "estimate_zero2_model_states_mem_needs"
    lines.append(f"  (trainable: DeepSpeed's {estimator}, which assumes 16-bit params + fp32 master weights, "
                 "gradients and Adam states"
                 + ("; ZeRO-1 keeps whole 16-bit gradients, so it needs somewhat more" if ds.zero_stage == 1 else "")
                 + "; frozen, forwards only: parameter bytes, "
                 + f"{2 if precision == 'bf16' else 4} per param in {precision}, "
                 + ("divided by the GPUs (ZeRO-3 shards them: deepspeed.shard_frozen)"
                    if ds.zero_stage == 3 and ds.shard_frozen else "a whole copy on each GPU") + ")")
    for plan in plans:
        if plan.skipped:
            lines.append(f"  {plan.name}: {plan.skipped}")
            continue
        lines.append(f"  {plan.name}:")
        for m in plan.models:
            if m.error:
                lines.append(f"    {m.role}{'' if m.role.endswith(m.ref) else f' ({m.ref})'}: {m.error}")
                continue
            if m.sampler:
                lines.append(f"    {m.role}: {_gib(m.gpu_bytes)} per GPU during the update")
            elif m.trainable:
                lines.append(f"    {m.role} (trainable, {m.ref}, {_billions(m.params)} params): {_gib(m.gpu_bytes)} "
                             f"per GPU (CPU {_gib(m.cpu_bytes)} per node)")
            else:
                how = f"sharded over {gpus} GPUs" if m.sharded else "whole copy per GPU"
                lines.append(f"    {m.role} ({_billions(m.params)} params, {precision}, {how}; serves "
                             f"{', '.join(m.serves)}): {_gib(m.gpu_bytes)} per GPU")
        total = plan.total_bytes
        known = sum(m.gpu_bytes for m in plan.models if m.gpu_bytes is not None)
        if total is None and known > gpu_gib * GIB:
            lines.append(f"    stage total at least {_gib(known)} per GPU of {gpu_gib:g} GiB (a model's size is "
                         f"unknown): DOES NOT FIT: raise deepspeed.zero_stage, offload (deepspeed.offload_optimizer "
                         "/ offload_param) or use more GPUs")
        elif total is None:
            lines.append(f"    stage total: unknown (a model's size is unknown; the others need {_gib(known)} "
                         "per GPU)")
        elif plan.fits:
            lines.append(f"    stage total {_gib(total)} per GPU of {gpu_gib:g} GiB: fits")
        else:
            lines.append(f"    stage total {_gib(total)} per GPU of {gpu_gib:g} GiB: DOES NOT FIT (need "
                         f"{_gib(total)}, have {gpu_gib:g} GiB): raise deepspeed.zero_stage, offload "
                         "(deepspeed.offload_optimizer / offload_param) or use more GPUs")
    return "\n".join(lines)
