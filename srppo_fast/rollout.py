"""Rollout engines: something that samples responses for prompts from the current policy.

The trainer talks to `RolloutEngine` only, so it does not care which engine produced a rollout. The
HF engine samples with the actor module itself (transformers `generate`), so its weights are always
current; an engine with its own copy of the weights (vLLM) gets them pushed in `update_weights`.
Log-probs are always recomputed by the trainer, never taken from the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .generation import Generations, generate


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

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generations:
        """`params.n` responses per prompt (consecutive), each with EOS included when it ended."""
        ...

    def update_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights."""
        ...


class HFRolloutEngine:
    """transformers `generate` on the actor module (CPU or one GPU)."""

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generations:
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=params.max_new_tokens, n=params.n,
                        do_sample=not params.greedy, temperature=params.temperature, top_p=params.top_p,
                        batch_size=self.batch_size, seeds=params.seeds, calls=params.calls)

    def update_weights(self, model) -> None:
        self.model = model  # the same module: nothing to copy


def make_engine(kind: str, model, tokenizer, batch_size: int) -> RolloutEngine:
    if kind == "hf":
        return HFRolloutEngine(model, tokenizer, batch_size)
    raise ValueError(f"unknown rollout engine {kind!r}")
