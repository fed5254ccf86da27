"""Shared fixtures: a tiny embedded world, its tokenizer (trained here), tiny transformers models."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run on CPU tensors through the interpreter, which must be chosen
# before triton is imported (importing torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from srppo_fast.config import WorldConfig  # noqa: E402

TINY_WORLD = dict(seed=0, num_corpus_docs=300, num_demos=8, num_demos_heldout=16, num_prompts=40, num_eval=20)
TINY_ARCH = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
             "tie_word_embeddings": True}


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """The session's own srppo-fast cache (dequantised GGUF models) and W&B directories, inherited by the runs it
    launches: tests neither read nor fill the user's."""
    os.environ["SRPPO_FAST_CACHE"] = str(tmp_path_factory.mktemp("srppo-fast-cache"))
    home = tmp_path_factory.mktemp("wandb-home")  # W&B's cache, staging and settings: not the user's
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        os.environ[var] = str(home / var.lower())


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    from srppo_fast.world import build_world

    return str(build_world(WorldConfig(**TINY_WORLD), tmp_path_factory.mktemp("world") / "world"))


@pytest.fixture(scope="session")
def tokenizer(world_dir):
    from srppo_fast.modeling import load_tokenizer

    return load_tokenizer(os.path.join(world_dir, "tokenizer"))


def make_model(tokenizer, arch: dict | None = None, attn: str = "varlen_sdpa", seed: int = 0):
    from srppo_fast.config import ModelConfig
    from srppo_fast.modeling import build_scratch_model

    cfg = ModelConfig(base="scratch", tokenizer="world", arch=dict(arch or TINY_ARCH), attn_implementation=attn)
    return build_scratch_model(cfg, tokenizer, seed)


@pytest.fixture
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return make_model(tokenizer)


def tiny_run_overrides(out_dir) -> list[str]:
    """Overrides that shrink the quickstart to seconds: a tiny world and model, few steps."""
    world = [f"world.{k}={v}" for k, v in TINY_WORLD.items()]
    arch = [f"model.arch.{k}={v}" for k, v in TINY_ARCH.items()]
    return [f"output_dir={out_dir}", "runtime.progress=false", "logging.backends=[jsonl]", *world, *arch,
            "pretrain.max_steps=6", "pretrain.batch_size=16", "sft.epochs=2", "sft.batch_size=4",
            "sft.optim.lr=1e-3"]


# ------------------------------------------------------------------------------------------------
# what a run computes in, phase by phase (test_precision.py; used in-process and inside launched subprocesses)

PHASES = {  # phase -> (module, attribute) of the function whose calls make up that phase
    "lm update": ("srppo_fast.stages.lm", "lm_train_step"),
    "lm held-out loss": ("srppo_fast.stages.lm", "lm_eval_loss"),
    "spin sampling": ("srppo_fast.stages.spin", "Sampler.sample"),
    "spin reference": ("srppo_fast.stages.spin", "pair_logprobs"),
    "spin update": ("srppo_fast.stages.spin", "spin_train_step"),
    "rl rollout": ("srppo_fast.stages.rl", "RLRun.rollout"),
    "rl scoring": ("srppo_fast.stages.rl", "score"),
    "rl update": ("srppo_fast.stages.rl", "ppo_update"),
    "eval": ("srppo_fast.evaluation", "evaluate_model"),
}


@contextlib.contextmanager
def linear_dtype_trace():
    """Yield a dict phase -> {(input dtype, weight dtype): count of nn.Linear calls} over the phases above (a
    forward pre-hook on every nn.Linear; each phase entered by patching its function)."""
    import functools
    import importlib

    trace: dict[str, dict[tuple[str, str], int]] = {}
    current: list[str] = []

    def hook(module, args):
        if current and isinstance(module, torch.nn.Linear) and args and torch.is_tensor(args[0]):
            key = (str(args[0].dtype).removeprefix("torch."), str(module.weight.dtype).removeprefix("torch."))
            bucket = trace.setdefault(current[-1], {})
            bucket[key] = bucket.get(key, 0) + 1

    def enter(phase, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            current.append(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                current.pop()
        return wrapped

    patched = []
    for phase, (module_name, attr) in PHASES.items():
        owner = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)
        setattr(owner, name, enter(phase, original))
        patched.append((owner, name, original))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield trace
    finally:
        handle.remove()
        for owner, name, original in patched:
            setattr(owner, name, original)
