"""Packed-sequence batching: which sequences go to which data-parallel rank and into which micro-batch.

The trainer has N sequences with token lengths, a token budget per micro-batch and W data-parallel ranks.
`plan_microbatches` returns a `PackPlan`: the ranks balanced by tokens, each rank's share packed into
micro-batches of at most `token_budget` tokens, every rank with the same number of micro-batches.

Spec (the C++ fast path `srppo_fast._packing` and the reference `plan_microbatches_ref` give identical arrays):
  1. Validate: lengths are integers >= 1, budget >= 1, world_size >= 1. A sequence longer than the budget is an
     error (oversize="error") or goes alone into a micro-batch of its own (oversize="own_batch"); never truncated.
  2. Rank balancing, Karmarkar-Karp largest differencing (W == 1: everything on rank 0).
     Sequences sorted by (length desc, index asc); each starts as a partition of W subsets (itself, W-1 empty).
     A partition's subsets are kept in order of sum desc (stable sort). A max-heap keyed by (max sum - min sum,
     then insertion counter, earlier first) starts with the partitions in sorted order. While more than one is
     left: pop A, then B; new_i = A_desc[i] U B_asc[i] (members listed A's first, then B's); stable sort of the
     new subsets by sum desc; push it with the next counter. The last partition's subsets are ranks 0..W-1.
  3. First-fit-decreasing per rank: sequences by (length desc, index asc), each into the lowest-numbered
     micro-batch with room, else a new one; members listed in insertion order.
  4. Equalize (equalize=True): M = the largest micro-batch count of any rank. A rank with fewer splits its
     micro-batch with the most tokens among those with >= 2 sequences (ties: lowest position): members, in
     order, go to the lighter of two new micro-batches (ties: the first); the first replaces the old one in
     place, the second is appended. With nothing left to split, empty micro-batches are appended up to M.

Shape letters: N sequences, W ranks, M micro-batches (all ranks together), T tokens of one micro-batch.
This module needs numpy only (no torch).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

try:
    from srppo_fast import _packing as _ext
except ImportError:  # not built: `pip install -e .` or `python setup.py build_ext --inplace`
    _ext = None

__all__ = [
    "PackPlan",
    "plan_microbatches",
    "plan_microbatches_ref",
    "microbatch_metadata",
    "microbatch_metadata_ref",
    "padded_to_longest_pad_fraction",
]

_OVERSIZE = ("error", "own_batch")
_IMPLS = ("cpp", "python", "auto")


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PackPlan:
    """Micro-batches of every rank, as flat int64 arrays (read-only).

    Micro-batch m holds sequences order[mb_offsets[m]:mb_offsets[m+1]]; rank r holds micro-batches
    rank_offsets[r]:rank_offsets[r+1]. Micro-batches of a rank are in the order they should run.
    """

    order: np.ndarray  # int64 [N]: sequence indices, grouped by rank, then micro-batch
    mb_offsets: np.ndarray  # int64 [M + 1]
    rank_offsets: np.ndarray  # int64 [W + 1]
    mb_tokens: np.ndarray  # int64 [M]: tokens in each micro-batch
    token_budget: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("order", "mb_offsets", "rank_offsets", "mb_tokens"):
            getattr(self, name).setflags(write=False)

    def num_microbatches(self, rank: int | None = None) -> int:
        """Micro-batches of `rank`, or of all ranks together when rank is None."""
        if rank is None:
            return len(self.mb_tokens)
        return int(self.rank_offsets[rank + 1] - self.rank_offsets[rank])

    def microbatches(self, rank: int) -> list[np.ndarray]:
        """Sequence indices of each micro-batch of `rank` (views into `order`)."""
        first, last = self.rank_offsets[rank], self.rank_offsets[rank + 1]
        return [self.order[self.mb_offsets[m] : self.mb_offsets[m + 1]] for m in range(first, last)]

    @property
    def total_tokens(self) -> int:
        return int(self.mb_tokens.sum())

    def rank_tokens(self) -> np.ndarray:
        """int64 [W]: tokens on each rank."""
        cumulative = np.concatenate([[0], np.cumsum(self.mb_tokens)])
        return cumulative[self.rank_offsets[1:]] - cumulative[self.rank_offsets[:-1]]

    def fill_fraction(self) -> float:
        """Tokens over micro-batch capacity (num_microbatches * token_budget); 1.0 for an empty plan."""
        capacity = self.num_microbatches() * self.token_budget
        return self.total_tokens / capacity if capacity else 1.0

    def pad_fraction(self) -> float:
        """Wasted capacity, 1 - fill_fraction(). Negative only when own_batch sequences exceed the budget."""
        return 1.0 - self.fill_fraction()


def plan_microbatches(
    lengths,
    token_budget: int,
    world_size: int = 1,
    *,
    oversize: str = "error",
    equalize: bool = True,
    impl: str = "cpp",
) -> PackPlan:
    """Plan micro-batches for W ranks (the spec is the module docstring).

    lengths: [N] token counts (list or integer numpy array). token_budget: most tokens in one micro-batch.
    oversize: "error" or "own_batch" for sequences longer than the budget. equalize: same micro-batch count on
    every rank. impl: "cpp" (the extension), "python" (plan_microbatches_ref) or "auto" (cpp when built).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "python" or (impl == "auto" and _ext is None):
        return plan_microbatches_ref(lengths, token_budget, world_size, oversize=oversize, equalize=equalize)
    lengths = _check_plan_args(lengths, token_budget, world_size, oversize)
    arrays = _extension().plan(lengths, int(token_budget), int(world_size), oversize == "own_batch", bool(equalize))
    return PackPlan(*arrays, token_budget=int(token_budget), world_size=int(world_size))


def plan_microbatches_ref(lengths, token_budget: int, world_size: int = 1, *, oversize: str = "error",
                          equalize: bool = True) -> PackPlan:
    """The pure-Python reference of plan_microbatches (steps as in the module docstring)."""
    lengths = _check_plan_args(lengths, token_budget, world_size, oversize).tolist()
    token_budget, world_size = int(token_budget), int(world_size)
    ranks = _karmarkar_karp_ref(lengths, world_size)  # 2.
    bins = [
        _first_fit_decreasing_ref(lengths, sorted(r, key=lambda i: (-lengths[i], i)), token_budget)  # 3.
        for r in ranks
    ]
    if equalize:
        target = max(len(b) for b in bins)
        for rank_bins in bins:
            _equalize_ref(rank_bins, target, lengths)  # 4.
    return _plan_from_bins(bins, lengths, token_budget, world_size)


# ---------------------------------------------------------------------------------------------------------
# 1. Validation (user-facing messages; the extension re-checks)
# ---------------------------------------------------------------------------------------------------------


def _check_plan_args(lengths, token_budget, world_size, oversize) -> np.ndarray:
    """Returns lengths as int64 [N]; raises ValueError naming the bad value and the fix."""
    _check_positive_int("token_budget", token_budget)
    _check_positive_int("world_size", world_size)
    if oversize not in _OVERSIZE:
        raise ValueError(f"oversize must be one of {_OVERSIZE}, got {oversize!r}")
    lengths = _as_lengths(lengths)
    too_long = np.flatnonzero(lengths > token_budget)
    if oversize == "error" and too_long.size:
        i = int(too_long[0])
        raise ValueError(
            f"sequence {i} has {lengths[i]} tokens, more than the micro-batch token budget {token_budget}: "
            "raise the budget or pass oversize='own_batch'"
        )
    return lengths


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _as_lengths(lengths) -> np.ndarray:
    """Token counts -> int64 [N], every one an integer >= 1."""
    values = np.asarray(lengths)
    if values.ndim != 1:
        raise ValueError(f"lengths must be a 1-D list of token counts, got shape {values.shape}")
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    if values.dtype == np.bool_ or not np.issubdtype(values.dtype, np.integer):
        i = _first_non_integer(lengths, values)
        bad = values[i].item() if isinstance(lengths, np.ndarray) else lengths[i]
        raise ValueError(
            f"sequence {i} has length {bad!r} ({type(bad).__name__}), not an integer token count: "
            "pass integer lengths, e.g. np.asarray(lengths, dtype=np.int64)"
        )
    if values.dtype == np.uint64 and values.max() > np.iinfo(np.int64).max:
        i = int(np.argmax(values))
        raise ValueError(f"sequence {i} has {values[i]} tokens, more than int64 holds")
    values = values.astype(np.int64, copy=False)
    bad = np.flatnonzero(values < 1)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"sequence {i} has {values[i]} tokens; every sequence needs at least 1 token: drop it")
    if int(values.max()) > (2**62) // len(values):
        raise ValueError("the token counts add up to more than 2^62: check the lengths")
    return values


def _first_non_integer(lengths, values: np.ndarray) -> int:
    """Index of the first entry that is not an integer (0 when every float happens to be whole)."""
    if not isinstance(lengths, np.ndarray):
        for i, x in enumerate(lengths):
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
                return i
    if values.dtype.kind in "fc":
        fractional = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if fractional.size:
            return int(fractional[0])
    return 0


# ---------------------------------------------------------------------------------------------------------
# 2. Karmarkar-Karp rank balancing (reference)
# ---------------------------------------------------------------------------------------------------------
# A subset is (sum, head, tail): its members are a chain head -> next_[head] -> ... -> tail. A partition is
# the list of its NON-EMPTY subsets in order of sum desc; the W - len(partition) empty ones are implied (they
# sort last, as every sum of a non-empty subset is >= 1).

_EMPTY = (0, -1, -1)


def _kk_heap_key(diff: int, counter: int) -> tuple[int, int]:
    """heapq is a min-heap: the largest difference first, then the earliest inserted."""
    return (-diff, counter)


def _karmarkar_karp_ref(lengths: list[int], world_size: int) -> list[list[int]]:
    """lengths: [N] -> W lists of sequence indices (rank r = r-th subset of the last partition, sum desc)."""
    n = len(lengths)
    if world_size == 1:
        return [list(range(n))]
    items = sorted(range(n), key=lambda i: (-lengths[i], i))
    heap = [(*_kk_heap_key(lengths[i], c), [(lengths[i], i, i)]) for c, i in enumerate(items)]
    heapq.heapify(heap)
    next_ = [-1] * n
    counter = n
    while len(heap) > 1:
        a = heapq.heappop(heap)[2]
        b = heapq.heappop(heap)[2]
        merged = _kk_combine_ref(a, b, world_size, next_)
        smallest = merged[-1][0] if len(merged) == world_size else 0
        heapq.heappush(heap, (*_kk_heap_key(merged[0][0] - smallest, counter), merged))
        counter += 1
    last = heap[0][2] if heap else []
    return [_chain(s[1], next_) for s in last] + [[] for _ in range(world_size - len(last))]


def _kk_combine_ref(a: list, b: list, world_size: int, next_: list[int]) -> list:
    """new_i = a_desc[i] U b_asc[i]; non-empty ones, stable-sorted by sum desc."""
    a_desc = a + [_EMPTY] * (world_size - len(a))
    b_asc = [_EMPTY] * (world_size - len(b)) + b[::-1]
    merged = [_join(x, y, next_) for x, y in zip(a_desc, b_asc)]
    return sorted((s for s in merged if s[0] > 0), key=lambda s: -s[0])


def _join(x: tuple, y: tuple, next_: list[int]) -> tuple:
    """Subset x U y, members x's then y's."""
    if x[0] == 0:
        return y
    if y[0] == 0:
        return x
    next_[x[2]] = y[1]
    return (x[0] + y[0], x[1], y[2])


def _chain(head: int, next_: list[int]) -> list[int]:
    members = []
    while head >= 0:
        members.append(head)
        head = next_[head]
    return members


# ---------------------------------------------------------------------------------------------------------
# 3. First-fit-decreasing (reference) and 4. equalize (reference)
# ---------------------------------------------------------------------------------------------------------


def _first_fit_decreasing_ref(lengths: list[int], items: list[int], budget: int) -> list[list[int]]:
    """items: one rank's sequences by (length desc, index asc) -> micro-batches (lists, insertion order)."""
    remaining = np.full(len(items) + 1, budget, dtype=np.int64)  # [bins]: an unopened bin has the whole budget
    bins: list[list[int]] = []
    for i in items:
        if lengths[i] > budget:  # oversize="own_batch": a closed micro-batch of its own
            remaining[len(bins)] = 0
            bins.append([i])
            continue
        b = int(np.argmax(remaining[: len(bins) + 1] >= lengths[i]))  # first with room; bin len(bins) always has
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        remaining[b] -= lengths[i]
    return bins


def _equalize_ref(bins: list[list[int]], target: int, lengths: list[int]) -> None:
    """Split (in place) the heaviest micro-batch with >= 2 sequences until `target` of them, then pad empties."""
    while len(bins) < target:
        splittable = [p for p, mb in enumerate(bins) if len(mb) >= 2]
        if not splittable:
            bins.extend([] for _ in range(target - len(bins)))
            return
        p = max(splittable, key=lambda p: (sum(lengths[i] for i in bins[p]), -p))
        first, second = _split_ref(bins[p], lengths)
        bins[p] = first
        bins.append(second)


def _split_ref(members: list[int], lengths: list[int]) -> tuple[list[int], list[int]]:
    """Each member, in order, to the lighter of two new micro-batches (ties: the first)."""
    halves: tuple[list[int], list[int]] = ([], [])
    tokens = [0, 0]
    for i in members:
        side = 0 if tokens[0] <= tokens[1] else 1
        halves[side].append(i)
        tokens[side] += lengths[i]
    return halves


def _plan_from_bins(bins: list[list[list[int]]], lengths: list[int], budget: int, world_size: int) -> PackPlan:
    """bins[r][m] = sequence indices of micro-batch m of rank r -> the flat PackPlan arrays."""
    flat = [mb for rank_bins in bins for mb in rank_bins]
    return PackPlan(
        order=np.array([i for mb in flat for i in mb], dtype=np.int64),
        mb_offsets=np.cumsum([0] + [len(mb) for mb in flat], dtype=np.int64),
        rank_offsets=np.cumsum([0] + [len(rank_bins) for rank_bins in bins], dtype=np.int64),
        mb_tokens=np.array([sum(lengths[i] for i in mb) for mb in flat], dtype=np.int64),
        token_budget=budget,
        world_size=world_size,
    )


# ---------------------------------------------------------------------------------------------------------
# Per-micro-batch metadata for varlen attention
# ---------------------------------------------------------------------------------------------------------


def microbatch_metadata(lengths, *, impl: str = "cpp") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lengths: [n] of ONE micro-batch, in micro-batch order ->
    cu_seqlens int32 [n + 1] (0, l0, l0 + l1, ...), position_ids int64 [T] (restart at 0 for every sequence),
    padded_index int64 [T] = row * max_len + offset, so padded.view(-1)[padded_index] = packed scatters packed
    per-token values to a [n, max_len] per-sequence layout (row = the sequence's position in the micro-batch).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "python" or (impl == "auto" and _ext is None):
        return microbatch_metadata_ref(lengths)
    try:  # called once per micro-batch: the extension checks the input itself, at no cost
        return _extension().metadata(lengths)
    except ValueError:
        _check_metadata_lengths(lengths)  # raises the user-facing message
        raise


def microbatch_metadata_ref(lengths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference of microbatch_metadata (numpy)."""
    lengths = _check_metadata_lengths(lengths)
    n, total = len(lengths), int(lengths.sum())
    max_len = int(lengths.max()) if n else 0
    cu_seqlens = np.zeros(n + 1, dtype=np.int32)
    cu_seqlens[1:] = np.cumsum(lengths)
    position_ids = np.arange(total, dtype=np.int64) - np.repeat(cu_seqlens[:-1].astype(np.int64), lengths)
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    return cu_seqlens, position_ids, rows * max_len + position_ids


def _check_metadata_lengths(lengths) -> np.ndarray:
    lengths = _as_lengths(lengths)
    if lengths.sum() > np.iinfo(np.int32).max:
        raise ValueError(f"the micro-batch has {lengths.sum()} tokens, more than int32 cu_seqlens hold")
    return lengths


# ---------------------------------------------------------------------------------------------------------
# Baseline for comparison
# ---------------------------------------------------------------------------------------------------------


def padded_to_longest_pad_fraction(lengths, batch_size: int) -> float:
    """Pad fraction of the naive batcher: batches of `batch_size` sequences in data order (the last may be
    smaller), each padded to its longest. 1 - tokens / sum over batches of (rows * longest)."""
    _check_positive_int("batch_size", batch_size)
    lengths = _as_lengths(lengths)
    if lengths.size == 0:
        return 0.0
    starts = np.arange(0, len(lengths), batch_size)
    longest = np.maximum.reduceat(lengths, starts)
    rows = np.diff(np.append(starts, len(lengths)))
    return 1.0 - int(lengths.sum()) / int((rows * longest).sum())


def _extension():
    if _ext is None:
        raise ImportError(
            "srppo_fast._packing is not built: run `pip install -e .` (or `python setup.py build_ext --inplace`) "
            "or pass impl='python'"
        )
    return _ext
