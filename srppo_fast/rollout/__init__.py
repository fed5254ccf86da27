"""Samplers: something that samples responses for prompts from the current policy.

The stages talk to `Sampler` only, and share its rank sharding and gathering (my_prompts, lockstep_calls,
gather_generations), so they do not care which engine produced a rollout:
- `hf` samples with the actor module itself (transformers `generate`), so its weights are always current;
- `vllm` (rollout/vllm_engine.py) holds its own copy of the weights, which `update_weights` brings up to date
  in buckets (rollout/sync.py) and RLRun verifies on a probe sequence.
The trainer recomputes the old log-probs of the PPO ratio itself; a sampler's own log-probs (vLLM) serve to
measure the sampler/trainer mismatch and, optionally, to correct for it (rollout.tis_cap).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch

from .. import dist
from ..errors import ConfigError, SamplerError
from ..experience import probe_logprobs
from ..generation import Generations, generate

log = logging.getLogger("srppo_fast")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    greedy: bool = False
    seeds: list[int] | None = None  # one per prompt: each sample's own random stream (generation.SeededSampling)
    calls: int = 0  # generate batches to run at least (ranks whose forwards are collective must run as many)


class Sampler(Protocol):
    """What the stages sample through (RLRun, SPIN), whichever engine it is. The stages never ask which: they ask
    what it does (`owns_weights`, `lockstep`, `group_size`)."""

    name: str  # for logs
    version: int  # the actor update its weights come from (0: the stage's initial weights)
    syncs: int  # weight syncs so far
    owns_weights: bool  # it holds its own copy of the weights, which `update_weights` brings up to date (vllm)
    lockstep: bool  # its forwards may be collective (the actor module under ZeRO-3): every rank calls as often
    group_size: int  # ranks that share one sampler (a colocated tensor-parallel group); each group answers its share
    incomplete: list[str]  # served parameters the last sync did not bring
    dtype: torch.dtype  # of its weights
    max_len: int | None  # the longest prompt + response it serves (None: the model's positions)

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> Future:
        """Start `params.n` responses per prompt (consecutive); `collect` gives them. (An engine that samples on the
        caller's thread returns a finished future.)"""
        ...

    def collect(self, future: Future, params: SamplingParams, what: str = "generate") -> Generations:
        """The submitted responses, each with EOS included when it ended, `versions` the weights' update and
        `logprobs` filled when it keeps its own; a SamplerError if the sampler failed or hung."""
        ...

    def wait(self, future: Future, what: str) -> object:
        ...

    def update_weights(self, model, version: int) -> dict:
        """Make it sample from `model`'s current weights (actor update `version`); returns what the sync cost
        (sync/seconds, sync/bytes, sync/buckets), empty when nothing was copied."""
        ...

    def prompt_logprobs(self, tokens: list[int]) -> torch.Tensor:
        """Its log-prob of every token of `tokens` after the first, given its prefix: [len - 1] (float64)."""
        ...

    def sleep(self) -> None:
        """The update is about to run: free what it can (a colocated GPU sampler)."""
        ...

    def close(self) -> None:
        ...


class HFRolloutEngine:
    """transformers `generate` on the actor module (CPU or one GPU), under the actor engine's compute precision
    (`autocast`: in a bf16 run the module's weights and so the KV cache are bf16 too). It samples with the actor
    itself, so its weights are always current."""

    name = "hf"
    owns_weights = False
    lockstep = True
    group_size = 1
    max_len = None

    def __init__(self, model, tokenizer, batch_size: int = 256, autocast=contextlib.nullcontext):
        self.model, self.tokenizer, self.batch_size, self.autocast = model, tokenizer, batch_size, autocast
        self.version, self.syncs, self.incomplete = 0, 0, []

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generations:
        with self.autocast():
            gens = generate(self.model, self.tokenizer, prompts, max_new_tokens=params.max_new_tokens, n=params.n,
                            do_sample=not params.greedy, temperature=params.temperature, top_p=params.top_p,
                            batch_size=self.batch_size, seeds=params.seeds, calls=params.calls)
        gens.versions = [self.version] * len(gens.responses)
        return gens

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> Future:
        future: Future = Future()
        try:
            future.set_result(self.generate(prompts, params))
        except Exception as e:  # noqa: BLE001 - handed to the caller through the future, as a thread would
            future.set_exception(e)
        return future

    def collect(self, future: Future, params: SamplingParams, what: str = "generate") -> Generations:
        return future.result()

    def wait(self, future: Future, what: str) -> object:
        return future.result()

    def update_weights(self, model, version: int) -> dict:
        self.model, self.version = model, version  # the same module: nothing to copy
        return {}

    @torch.no_grad()
    def prompt_logprobs(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens], device=next(self.model.parameters()).device)
        with self.autocast():
            logits = self.model(input_ids=ids).logits[0, :-1].float()
        return logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0].double().cpu()

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


def my_prompts(sampler: Sampler, n_prompts: int) -> list[int]:
    """This rank's share of `n_prompts` prompts: every G-th, G the number of samplers (ranks, or groups of ranks
    that share one), so a prompt's samples stay together; the ranks of a group submit the same prompts."""
    group, groups = dist.rank() // sampler.group_size, max(1, dist.world_size() // sampler.group_size)
    return list(range(group, n_prompts, groups))


def lockstep_calls(sampler: Sampler, n_mine: int, per_call: int) -> int:
    """The generate calls every rank must make when the sampler's forwards are collective: the most any rank
    needs for its share (0: no constraint)."""
    if not sampler.lockstep:
        return 0
    return int(dist.all_reduce([math.ceil(n_mine / max(1, per_call))], "max")[0])


def gather_generations(mine: list[int], local: Generations, n_prompts: int, n: int) -> tuple[Generations, list]:
    """Every rank's share, gathered so that every rank holds the whole set in prompt order (`n` samples per
    prompt); returns it with the samplers' own seconds on their shares."""
    shares = dist.all_gather_object((mine, local.responses, local.ended, local.logprobs, local.versions,
                                     local.seconds))
    total = n_prompts * n
    columns = [[None] * total for _ in range(4)]  # responses, ended, logprobs, versions: per sample
    for prompts_of_rank, *per_sample, _ in shares:
        for column, values in zip(columns, per_sample):
            for j, i in enumerate(prompts_of_rank if values is not None else ()):
                column[i * n:(i + 1) * n] = values[j * n:(j + 1) * n]
    responses, ended, logprobs, versions = columns
    if any(lp is None for lp in logprobs):
        logprobs = None
    gens = Generations(responses, ended, [i for i in range(n_prompts) for _ in range(n)], logprobs, versions)
    return gens, [sec for *_, sec in shares if sec is not None]


def check_due(sampler: Sampler, every: int) -> bool:
    """Whether the sampler's weights are verified after its latest sync: after the first, every `every` syncs
    (rollout.sync_check_every; 0: the first only), and whenever any rank's sync left parameters unloaded."""
    n = sampler.syncs
    return n == 1 or bool(every and n % every == 0) or dist.any_true(bool(sampler.incomplete))


def probe_tokens(prompts: list[list[int]], limit: int) -> list[int]:
    """A sync check's probe: two prompts of the stage's set back to back (text the model has seen the like of)."""
    return (prompts[0] + prompts[min(1, len(prompts) - 1)])[:limit]


def verify_sync(sampler: Sampler, actor, tokens: list[int], device: torch.device, precision: str, tol: float | None,
                what: str) -> dict:
    """The sampler's log-probs of the probe `tokens` against the trainer's (the `actor` engine's module), every
    rank its own sampler: a SamplerError on every rank when any differs by more than `tol` nats per token on
    average (default: 1e-3 when both compute in float32, else 3e-2), since it then serves other weights than the
    trainer's. `what`: which sync, for the message. Returns the check's statistics."""
    tokens = tokens[:sampler.max_len or len(tokens)]
    trainer = probe_logprobs(actor.model, tokens, device, actor.autocast).double()
    error, diff = None, torch.zeros(1)
    try:
        diff = (sampler.prompt_logprobs(tokens) - trainer).abs()
    except SamplerError as e:
        error = e
    dist.first_error(error)
    exact = sampler.dtype == torch.float32 and precision == "fp32"  # both sides compute in fp32
    tol = tol or (1e-3 if exact else 3e-2)
    mean, worst = float(diff.mean()), float(diff.max())
    bad = dist.all_reduce([mean], "max")[0]
    if not bad <= tol:
        raise SamplerError(f"weight sync check failed after sync {sampler.syncs} ({what}): the sampler's log-probs of "
                           f"the probe differ from the trainer's by {bad:.3g} nats per token on average "
                           f"(rollout.sync_check_tol {tol:g}), so it serves other weights than the trainer's; "
                           "stopping rather than training on samples from them.")
    log.info("sampler weights verified after sync %d: probe |dlogp| mean %.2e, max %.2e over %d tokens",
             sampler.syncs, mean, worst, len(diff))
    return {"sync/check_mean": mean, "sync/check_max": worst}


def start_sampler(ctx, rollout, init_path: str, key: str) -> Sampler | None:
    """The stage's own-weights sampler (rollout.engine vllm), started before the stage's models load (its share of
    the device is free then), from the checkpoint directory `init_path`; None for hf, which samples with the
    actor module once it is built (HFRolloutEngine)."""
    if rollout.engine == "hf":
        return None
    from ..modeling import model_source
    from .vllm_engine import sampler
    from .vllm_support import context_length

    path = model_source(init_path)[0]  # a GGUF file: its dequantised copy
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{rollout.engine} rollouts start the sampler from a checkpoint directory, but {key} "
                          f"resolves to {path!r}; point it at a stage of this run or a checkpoint directory, or use "
                          "rollout.engine=hf.")
    return sampler(path, ctx.tokenizer().eos_token_id, rollout, device=ctx.device, precision=ctx.precision,
                   seed=ctx.cfg.seed, max_model_len=context_length(ctx.vllm_context(), path),
                   world_size=dist.world_size())


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
