"""Rollout engines: something that samples responses for prompts from the current policy.

The trainer talks to `RolloutEngine` only, so it does not care which engine produced a rollout:
- `hf` samples with the actor module itself (transformers `generate`), so its weights are always current;
- `vllm` (rollout/vllm_engine.py) holds its own copy of the weights, which `update_weights` brings up to date
  in buckets (rollout/sync.py) and RLRun verifies on a probe sequence.
The trainer recomputes the old log-probs of the PPO ratio itself; a sampler's own log-probs (vLLM) serve to
measure the sampler/trainer mismatch and, optionally, to correct for it (rollout.tis_cap).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

from ..generation import Generations, generate


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    greedy: bool = False
    seeds: list[int] | None = None  # one per prompt: each sample's own random stream (generation.SeededSampling)
    calls: int = 0  # generate batches to run at least (ranks whose forwards are collective must run as many)


class RolloutEngine(Protocol):
    name: str
    version: int  # the actor update the engine's weights come from (0: the stage's initial weights)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generations:
        """`params.n` responses per prompt (consecutive), each with EOS included when it ended; `logprobs`
        filled when the engine keeps its own."""
        ...

    def update_weights(self, model, version: int) -> dict:
        """Make the engine sample from `model`'s current weights (actor update `version`); returns what the
        sync cost (seconds, bytes, buckets), empty when nothing was copied."""
        ...

    def sleep(self) -> None:
        """The update is about to run: free what the engine can (a colocated GPU sampler)."""
        ...

    def close(self) -> None:
        ...


class HFRolloutEngine:
    """transformers `generate` on the actor module (CPU or one GPU), under the actor engine's compute precision
    (`autocast`: in a bf16 run the module's weights and so the KV cache are bf16 too)."""

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 256, autocast=contextlib.nullcontext):
        self.model, self.tokenizer, self.batch_size, self.autocast = model, tokenizer, batch_size, autocast
        self.version = 0

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generations:
        with self.autocast():
            return generate(self.model, self.tokenizer, prompts, max_new_tokens=params.max_new_tokens, n=params.n,
                            do_sample=not params.greedy, temperature=params.temperature, top_p=params.top_p,
                            batch_size=self.batch_size, seeds=params.seeds, calls=params.calls)

    def update_weights(self, model, version: int) -> dict:
        self.model, self.version = model, version  # the same module: nothing to copy
        return {}

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


def shutdown_samplers() -> None:
    """End of the process: shut down the vLLM samplers, if any were started."""
    import sys

    module = sys.modules.get("srppo_fast.rollout.vllm_engine")
    if module is not None:
        module.shutdown_all()


def sampler_hung() -> bool:
    """A vLLM sampler of this process is stuck in a call (the process cannot wind down normally)."""
    import sys

    module = sys.modules.get("srppo_fast.rollout.vllm_engine")
    return module is not None and any(engine.busy() for engine in module._LIVE)
