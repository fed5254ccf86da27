"""Shared fixtures: a tiny embedded world, its tokenizer (trained here), tiny transformers models."""

from __future__ import annotations

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
