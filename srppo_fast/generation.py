"""Sampling responses with Hugging Face `generate` (the embedded/CPU rollout engine).

Prompts are token-id lists; they are left-padded into batches of similar length. Returned
responses are cut after the first EOS; `ended` says whether an EOS was produced.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Generations:
    responses: list[list[int]]  # per sample, EOS included when produced
    ended: list[bool]  # produced an EOS within max_new_tokens
    prompt_index: list[int]  # which prompt each sample answers (n samples per prompt, consecutive)


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
             generator_seed: int | None = None) -> Generations:
    """Sample `n` responses per prompt. Batches are formed from prompts sorted by length."""
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list[list[int] | None] = [None] * (len(prompts) * n)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    with generation_mode(model):
        for start in range(0, len(order), max(1, batch_size // n)):
            chunk = order[start:start + max(1, batch_size // n)]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
                if do_sample else {"do_sample": False}
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=eos,
                                 pad_token_id=pad, **sampling)
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
