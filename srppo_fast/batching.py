"""Packed micro-batches as tensors: one flattened row per micro-batch, position_ids restarting per sequence.

transformers (>= 4.53) detects packed rows from position_ids when no attention mask is given and
the cache is off, and keeps attention inside each sequence (sdpa/eager: a block-diagonal causal
mask; flash-attention: varlen with cu_seqlens). tests/test_packed_forward.py checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .packing import PackPlan, microbatch_metadata, plan_microbatches
from .tokens import TokenizedSet

IGNORE = -100


@dataclass
class PackedBatch:
    """Sequences `seq_ids` of a TokenizedSet, packed into one row of N tokens."""

    input_ids: torch.Tensor  # [1, N] int64
    position_ids: torch.Tensor  # [1, N] int64, restarting at 0 for every sequence
    labels: torch.Tensor  # [1, N] int64: the next token where it is a target, else -100
    cu_seqlens: torch.Tensor  # [n+1] int32
    padded_index: torch.Tensor  # [N] int64: row * max_len + offset, to unpack into [n, max_len]
    seq_ids: np.ndarray  # [n] indices into the TokenizedSet
    max_len: int
    num_targets: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device) -> PackedBatch:
        move = {k: getattr(self, k).to(device, non_blocking=True)
                for k in ("input_ids", "position_ids", "labels", "cu_seqlens", "padded_index")}
        return PackedBatch(**move, seq_ids=self.seq_ids, max_len=self.max_len, num_targets=self.num_targets)

    def unpack(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Per-token values [N] (or [1, N]) -> [n, max_len] in micro-batch sequence order."""
        n = len(self.seq_ids)
        out = packed.new_full((n * self.max_len,), fill)
        out[self.padded_index] = packed.reshape(-1)
        return out.view(n, self.max_len)


def pack_sequences(data: TokenizedSet, seq_ids: np.ndarray) -> PackedBatch:
    """Gather sequences `seq_ids` into one packed row with shifted labels that never cross sequences."""
    seq_ids = np.asarray(seq_ids, dtype=np.int64)
    starts, ends = data.offsets[seq_ids], data.offsets[seq_ids + 1]
    lengths = ends - starts
    index = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(seq_ids) else \
        np.zeros(0, dtype=np.int64)
    tokens = data.tokens[index].astype(np.int64)
    targets = data.targets[index]
    cu_seqlens, position_ids, padded_index = microbatch_metadata(lengths)
    # label[t] = token[t+1] when token t+1 is a target of the same sequence
    next_tokens = np.roll(tokens, -1)
    next_is_target = np.roll(targets, -1)
    if len(lengths):
        next_is_target[cu_seqlens[1:].astype(np.int64) - 1] = False
    labels = np.where(next_is_target, next_tokens, IGNORE)
    return PackedBatch(
        input_ids=torch.from_numpy(tokens).unsqueeze(0),
        position_ids=torch.from_numpy(np.asarray(position_ids, dtype=np.int64)).unsqueeze(0),
        labels=torch.from_numpy(labels).unsqueeze(0),
        cu_seqlens=torch.from_numpy(np.asarray(cu_seqlens, dtype=np.int32)),
        padded_index=torch.from_numpy(np.asarray(padded_index, dtype=np.int64)),
        seq_ids=seq_ids,
        max_len=int(lengths.max()) if len(lengths) else 0,
        num_targets=int(next_is_target.sum()),
    )


def plan_batch(data: TokenizedSet, seq_ids: np.ndarray, token_budget: int, world_size: int = 1) -> PackPlan:
    """Plan micro-batches for the sequences `seq_ids` (the plan's indices refer to positions in seq_ids)."""
    return plan_microbatches(data.lengths[seq_ids], token_budget, world_size)


def microbatches(data: TokenizedSet, seq_ids: np.ndarray, token_budget: int) -> list[PackedBatch]:
    """Packed micro-batches of the sequences `seq_ids` on one rank (first-fit-decreasing under the budget)."""
    plan = plan_batch(data, seq_ids, token_budget)
    return [pack_sequences(data, seq_ids[idx]) for idx in plan.microbatches(0) if len(idx)]


def dummy_batch() -> PackedBatch:
    """A two-token micro-batch with one target: a rank with no sequences left runs it (its loss times 0) so that
    every rank runs the same number of forwards and backwards (ZeRO gathers parameters and reduces gradients
    in them, collectively); it adds exactly zero to every gradient."""
    dummy = TokenizedSet(np.zeros(2, dtype=np.int32), np.array([False, True]), np.array([0, 2], dtype=np.int64))
    return pack_sequences(dummy, np.array([0]))


@dataclass
class RankShare:
    """This rank's micro-batches of a step (`None` for a dummy one) and the step's balance over the ranks."""

    batches: list[PackedBatch | None]
    rank_tokens: np.ndarray  # [W] tokens on each rank

    @property
    def imbalance(self) -> float:
        """Most tokens on one rank over the mean (1.0: perfectly balanced)."""
        mean = float(self.rank_tokens.mean()) if len(self.rank_tokens) else 0.0
        return float(self.rank_tokens.max()) / mean if mean > 0 else 1.0

    def real(self) -> list[PackedBatch]:
        return [b for b in self.batches if b is not None]

    def on_device(self, device: torch.device):
        """(micro-batch on `device`, real) for each micro-batch of the rank, a dummy_batch() where it has none."""
        for batch in self.batches:
            yield (batch if batch is not None else dummy_batch()).to(device), batch is not None


def rank_microbatches(data: TokenizedSet, seq_ids: np.ndarray, token_budget: int, rank: int,
                      world_size: int) -> RankShare:
    """The sequences `seq_ids` spread over `world_size` ranks, balanced by tokens (Karmarkar-Karp), each rank's
    share packed under the budget; every rank gets the same number of micro-batches (empty ones: None)."""
    plan = plan_batch(data, seq_ids, token_budget, world_size)
    batches = [pack_sequences(data, seq_ids[idx]) if len(idx) else None for idx in plan.microbatches(rank)]
    return RankShare(batches, plan.rank_tokens())


def padded_pad_fraction(lengths_per_microbatch: list[np.ndarray]) -> float:
    """The padding that padding each micro-batch's sequences to its longest would have computed."""
    real = sum(int(x.sum()) for x in lengths_per_microbatch)
    padded = sum(int(x.max()) * len(x) for x in lengths_per_microbatch if len(x))
    return 1.0 - real / padded if padded else 0.0


class EpochSampler:
    """An endless stream of example indices: a seeded permutation per epoch, batches may straddle epochs.
    `position` (examples consumed) is all that a resume needs."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, position: int = 0):
        self.n, self.seed, self.shuffle, self.position = n, seed, shuffle, position

    def _epoch(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            epoch, offset = divmod(self.position, self.n)
            chunk = self._epoch(epoch)[offset:offset + k]
            out.append(chunk)
            self.position += len(chunk)
            k -= len(chunk)
        return np.concatenate(out)
