"""Sampling responses with Hugging Face `generate` (the embedded/CPU rollout engine).

Prompts are token-id lists; they are left-padded into batches of similar length. Returned
responses are cut after the first EOS; `ended` says whether an EOS was produced.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch


def zero3_sharded(model) -> bool:
    """The model's parameters are ZeRO-3 shards over more than one rank (its forwards are collective)."""
    from . import dist

    return dist.world_size() > 1 and any(hasattr(p, "ds_id") for p in model.parameters())


def sample_seed(*key: int) -> int:
    """A 63-bit seed for one sample, from integers (run seed, step, prompt index, sample index)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class SeededSampling:
    """A logits processor that turns greedy decoding into sampling with each row's own random stream: scores / T,
    top-p, then Gumbel noise from the row's generator, so argmax draws from softmax(scores / T) restricted to the
    nucleus. A sample then depends on its seed and the model only, not on which rank or batch produced it (the
    same config samples the same responses at any world size)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, index = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            outside = probs.cumsum(-1) - probs > self.top_p  # the mass before this token already exceeds top_p
            scores = scores.masked_fill(outside.scatter(-1, index, outside), float("-inf"))
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        tiny = torch.finfo(torch.float32).tiny
        return scores - torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


@dataclass
class Generations:
    responses: list[list[int]]  # per sample, EOS included when produced
    ended: list[bool]  # produced an EOS within max_new_tokens
    prompt_index: list[int]  # which prompt each sample answers (n samples per prompt, consecutive)
    logprobs: list[list[float]] | None = None  # the sampler's own log-prob of each response token (vllm)
    versions: list[int] | None = None  # per sample: the actor update whose weights drew it
    seconds: float | None = None  # the sampler's own time on them (it may have run during an update)


@contextlib.contextmanager
def generation_mode(model):
    """Eval mode, the KV cache on, and transformers' sdpa (padded batches need its masks)."""
    was_training = model.training
    impl = model.config._attn_implementation
    use_cache = model.config.use_cache
    model.eval()
    model.config.use_cache = True
    if impl != "sdpa" and impl != "flash_attention_2":
        model.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        if model.config._attn_implementation != impl:
            model.set_attn_implementation(impl)
        model.config.use_cache = use_cache
        model.train(was_training)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, n: int = 1,
             do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
             generator_seed: int | None = None, seeds: list[int] | None = None, synced: bool = False,
             calls: int = 0) -> Generations:
    """Sample `n` responses per prompt. Batches are formed from prompts sorted by length.

    seeds: one per prompt; sample k of prompt i then draws from its own stream (SeededSampling), seeded with
    sample_seed(seeds[i], k). synced: the model's parameters are ZeRO-3 shards on several ranks; every forward
    is collective, so `calls` (the most batches any rank has) batches run, padding ones included, and a rank
    whose batch is done keeps stepping with the others (transformers' synced_gpus)."""
    device = next(model.parameters()).device
    synced = synced or zero3_sharded(model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list[list[int] | None] = [None] * (len(prompts) * n)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    per_call = max(1, batch_size // n)
    starts = list(range(0, len(order), per_call))
    if synced:  # padding batches, so every rank runs as many collective forwards: one prompt, discarded
        starts += [None] * max(0, calls - len(starts))
    with generation_mode(model):
        for start in starts:
            chunk = order[start:start + per_call] if start is not None else []
            if not chunk:
                model.generate(input_ids=torch.full((1, 1), eos, dtype=torch.long, device=device),
                               attention_mask=torch.ones((1, 1), dtype=torch.long, device=device),
                               max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, do_sample=False,
                               synced_gpus=synced)
                continue
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            repeat = n
            if do_sample and seeds is not None:  # greedy on noised scores, the n samples as rows of their own
                rows = [sample_seed(seeds[i], k) for i in chunk for k in range(n)]
                ids, mask, repeat = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), 1
                sampling = {"do_sample": False, "logits_processor": [SeededSampling(rows, temperature, top_p, device)]}
            elif do_sample:
                sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            else:
                sampling = {"do_sample": False}
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, num_return_sequences=repeat, eos_token_id=eos,
                                 pad_token_id=pad, synced_gpus=synced, **sampling)
            new = out[:, width:].tolist()  # [len(chunk) * n, <= max_new_tokens]
            for row, i in enumerate(chunk):
                for k in range(n):
                    responses[i * n + k] = new[row * n + k]
    cut, ended = [], []
    for r in responses:
        if eos in r:
            r = r[:r.index(eos) + 1]
            ended.append(True)
        else:
            ended.append(False)
        cut.append(r)
    return Generations(cut, ended, [i for i in range(len(prompts)) for _ in range(n)])
