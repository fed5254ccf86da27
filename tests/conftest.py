"""Shared fixtures: a tiny embedded world, its tokenizer (trained here), tiny transformers models; the
`requires` mark. Plain helpers live in tests/helpers.py."""

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

from .helpers import (  # noqa: E402
    TINY_WORLD,
    make_model,
    require_installed,
)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """`@pytest.mark.requires("module", ...)`: skip where one is missing, fail in CI (helpers.require_installed);
    before the test's fixtures are set up."""
    for mark in item.iter_markers("requires"):
        require_installed(*mark.args)


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


@pytest.fixture
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return make_model(tokenizer)
