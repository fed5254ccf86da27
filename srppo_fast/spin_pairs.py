"""SPIN's data and step (stages/spin.py runs them): the demonstrations, the (demonstration, sample) pairs of an
iteration packed two by two, their sequence log-probs, the DPO loss and one optimizer step over pairs."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import dist
from .batching import PackedBatch, RankShare, pack_sequences
from .config import SpinStageConfig
from .data import DataError, read_records
from .experience import packed_token_logprobs
from .generation import Generations
from .packing import plan_microbatches
from .rl.samples import verify_samples
from .tokens import TokenizedSet, _target_mask, max_token_chars, prompt_tokens, render_with_spans

log = logging.getLogger("srppo_fast")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, identical: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: (-log sigmoid(h), h) with h = beta * [(pi_c - ref_c) - (pi_r - ref_r)] from summed log-probs.
    A pair whose rejected sequence is its chosen one (`identical`) has no gradient (mathematically its two
    terms cancel; numerically only to rounding, so its h is detached) but keeps its place in the mean."""
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    if identical is not None and bool(identical.any()):
        h = torch.where(identical, h.detach(), h)
    return -F.logsigmoid(h), h


class Demos:
    """The demonstrations as SPIN reads them: each one's prompt (rendered with the generation prompt) and its
    chosen sequence (the whole conversation, targets on the last assistant turn only)."""

    def __init__(self, spec: str, tokenizer, world_dir: str | None, max_prompt_len: int, max_seq_len: int,
                 key: str):
        self.prompts: list[list[int]] = []
        self.questions: list[str] = []
        self.chosen: list[tuple[np.ndarray, np.ndarray]] = []  # (tokens, targets)
        self.dropped = 0
        records = read_records(spec, "sft", world_dir)
        for rec in records:
            if rec.messages[-1]["role"] != "assistant":
                raise DataError(f"{rec.where}: SPIN needs conversations that end with the assistant's turn (the "
                                "demonstration it prefers to the model's own answer); this one ends with a "
                                f"{rec.messages[-1]['role']} turn.")
            prompt = prompt_tokens(tokenizer, rec.messages[:-1], limit=max_prompt_len)
            text, spans = render_with_spans(tokenizer, rec.messages)
            if len(prompt) > max_prompt_len or len(text) > max_seq_len * max_token_chars(tokenizer):
                self.dropped += 1  # too long by its length alone: never tokenized whole
                continue
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, targets = enc["input_ids"], _target_mask(enc["offset_mapping"], spans[-1:])
            targets[0] = False
            if len(prompt) > max_prompt_len or len(ids) > max_seq_len or not targets.any():
                self.dropped += 1
                continue
            self.prompts.append(prompt)
            self.questions.append(rec.messages[-2]["content"] if len(rec.messages) > 1 else "")
            self.chosen.append((np.asarray(ids, dtype=np.int32), targets))
        if not self.prompts:
            raise DataError(f"{key}: all {len(records)} demonstrations of '{spec}' are longer than max_prompt_len / "
                            "max_seq_len (or have no response tokens); raise those limits.")


def build_pairs(demos: Demos, samples: list[list[int]]) -> TokenizedSet:
    """Sequences 2i (chosen: demonstration i) and 2i+1 (rejected: its prompt + the sampled response)."""
    parts_t, parts_m = [], []
    for i, response in enumerate(samples):
        tokens, targets = demos.chosen[i]
        prompt = demos.prompts[i]
        parts_t += [tokens, np.asarray(prompt + response, dtype=np.int32)]
        parts_m += [targets, np.r_[np.zeros(len(prompt), bool), np.ones(len(response), bool)]]
    lengths = [len(t) for t in parts_t]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedSet(np.concatenate(parts_t), np.concatenate(parts_m), offsets)


def pair_share(pairs: TokenizedSet, pair_ids: np.ndarray, budget: int, rank: int, world_size: int) -> RankShare:
    """Pairs `pair_ids` over the ranks, balanced by tokens, each micro-batch holding whole pairs (chosen at even,
    rejected at odd positions of its seq_ids); every rank gets as many micro-batches (None: a dummy)."""
    lengths = pairs.lengths[2 * pair_ids] + pairs.lengths[2 * pair_ids + 1]
    plan = plan_microbatches(lengths, budget, world_size)
    batches = []
    for idx in plan.microbatches(rank):
        seqs = np.stack([2 * pair_ids[idx], 2 * pair_ids[idx] + 1], axis=1).reshape(-1)
        batches.append(pack_sequences(pairs, seqs) if len(idx) else None)
    return RankShare(batches, plan.rank_tokens())


def sequence_logprobs(model, batch: PackedBatch) -> torch.Tensor:
    """Summed log-prob of each packed sequence's targets: [n sequences], in the batch's seq_ids order."""
    logp = packed_token_logprobs(model, batch)
    seq = torch.repeat_interleave(torch.arange(len(batch.seq_ids), device=logp.device),
                                  (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(logp.device).long())
    return torch.zeros(len(batch.seq_ids), dtype=logp.dtype, device=logp.device).index_add_(0, seq, logp)


@torch.no_grad()
def pair_logprobs(engine, pairs: TokenizedSet, budget: int) -> torch.Tensor:
    """[P, 2] fp64 (chosen, rejected) summed log-probs of every pair under the engine's model as it is now, each
    rank computing its share (forwards in lockstep: ZeRO-3 gathers parameters collectively)."""
    n = len(pairs) // 2
    out = torch.zeros(n, 2, dtype=torch.float64)
    model = engine.model
    was_training = model.training
    model.eval()
    share = pair_share(pairs, np.arange(n), budget, dist.rank(), dist.world_size())
    for batch, real in share.on_device(engine.device):
        with engine.autocast():
            sums = sequence_logprobs(model, batch)
        if real:
            out[torch.as_tensor(batch.seq_ids[0::2] // 2)] = sums.double().view(-1, 2).cpu()
    model.train(was_training)
    return dist.all_reduce_tensor_(out)  # each pair is filled on one rank: the sum is exact


def spin_train_step(engine, pairs: TokenizedSet, ref: torch.Tensor, identical: torch.Tensor, pair_ids: np.ndarray,
                    beta: float, budget: int) -> dict:
    """The mean DPO loss over the pairs `pair_ids` (the same on every rank; each rank runs its share)."""
    t0, comm0 = time.perf_counter(), dist.comm_seconds()
    share = pair_share(pairs, pair_ids, budget, dist.rank(), dist.world_size())
    n_pairs = len(pair_ids)
    sums = dict.fromkeys(("loss", "rewards/margin", "rewards/accuracy", "rewards/chosen", "rewards/rejected",
                          "logps/chosen", "logps/rejected"), 0.0)
    for batch, real in share.on_device(engine.device):
        with engine.autocast():
            seq_logp = sequence_logprobs(engine.model, batch).float()
        if not real:  # a dummy micro-batch: the same collectives as the other ranks, zero gradient
            engine.backward(seq_logp.sum() * 0.0)
            continue
        policy = seq_logp.view(-1, 2)
        ids = torch.as_tensor(batch.seq_ids[0::2] // 2)
        r = ref[ids].to(policy.device, torch.float32)
        losses, h = dpo_loss(policy[:, 0], policy[:, 1], r[:, 0], r[:, 1], beta, identical[ids].to(policy.device))
        engine.backward(losses.sum() / n_pairs)
        with torch.no_grad():
            chosen, rejected = beta * (policy[:, 0] - r[:, 0]), beta * (policy[:, 1] - r[:, 1])
            for key, value in (("loss", losses), ("rewards/margin", h), ("rewards/accuracy", (h > 0).float()),
                               ("rewards/chosen", chosen), ("rewards/rejected", rejected),
                               ("logps/chosen", policy[:, 0]), ("logps/rejected", policy[:, 1])):
                sums[key] += float(value.sum())
    sums = dist.all_reduce_dict(sums)
    stats = engine.step(loss_finite=math.isfinite(sums["loss"]))
    n_tokens = int(share.rank_tokens.sum())
    out = {**{k: v / n_pairs for k, v in sums.items()}, **stats, "nonfinite_steps": engine.nonfinite_steps,
           "tokens": n_tokens, "tokens_per_s": n_tokens / (time.perf_counter() - t0),
           "microbatches": len(share.batches)}
    if dist.world_size() > 1:
        out.update({"rank_imbalance": share.imbalance, "time/comm": dist.comm_seconds() - comm0})
    return out


def steps_per_iteration(spin: SpinStageConfig, n_pairs: int) -> int:
    return max(1, math.ceil(spin.epochs * n_pairs / spin.batch_size))


def iteration_stats(demos: Demos, pairs: TokenizedSet, gens: Generations, tokenizer, verifier
                    ) -> tuple[dict, torch.Tensor]:
    """What an iteration's samples look like, and which pairs are one sequence twice (the sample reproduced its
    demonstration token for token, prompt tokenization included)."""
    identical = torch.tensor([np.array_equal(pairs.sequence(2 * i)[0], pairs.sequence(2 * i + 1)[0])
                              for i in range(len(pairs) // 2)])
    stats = {"spin/identical_fraction": float(identical.float().mean()),
             "spin/sample_length": float(np.mean([len(r) for r in gens.responses])),
             "spin/sample_eos_rate": float(np.mean(gens.ended))}
    stats.update(verify_samples(verifier, tokenizer, demos.questions, gens.responses, "spin/sample_"))
    return stats, identical
