"""Packed-sequence batcher: C++ fast path == Python reference, the plan's guarantees, hand-worked cases, errors.

The C++ cases need the extension (`pip install -e .` or `python setup.py build_ext --inplace`); without it they
are skipped with that reason and `test_extension_is_built` fails, so a missing build never passes silently.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import srppo_fast.packing as pk
from srppo_fast.packing import (
    PackPlan,
    microbatch_metadata,
    microbatch_metadata_ref,
    padded_to_longest_pad_fraction,
    plan_microbatches,
    plan_microbatches_ref,
)

needs_ext = pytest.mark.requires("srppo_fast._packing")  # built by `pip install -e .`
FIELDS = ("order", "mb_offsets", "rank_offsets", "mb_tokens")
PROPERTY_SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CHECK_SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_extension_is_built():
    assert pk._ext is not None, "srppo_fast._packing is not built: pip install -e . (the C++ tests were skipped)"


def assert_same_plan(a: PackPlan, b: PackPlan) -> None:
    for field in FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype == np.int64, field
        np.testing.assert_array_equal(x, y, err_msg=field)


def same_plan(a: PackPlan, b: PackPlan) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def as_lists(plan: PackPlan) -> list[list[list[int]]]:
    """plan -> [rank][micro-batch] = list of sequence indices."""
    return [[mb.tolist() for mb in plan.microbatches(r)] for r in range(plan.world_size)]


def rank_sequences(plan: PackPlan, rank: int) -> list[int]:
    first, last = plan.mb_offsets[plan.rank_offsets[rank]], plan.mb_offsets[plan.rank_offsets[rank + 1]]
    return sorted(plan.order[first:last].tolist())


# Lengths from three regimes: many ties (1..6), a realistic spread, and huge lengths for few sequences (the
# C++ KK then uses its binary heap instead of the per-diff buckets: lengths > max(2N, 2^17)).
lengths_st = st.one_of(
    st.lists(st.integers(1, 6), max_size=60),
    st.lists(st.integers(1, 400), max_size=200),
    st.lists(st.integers(1, 3_000_000), max_size=30),
)


@st.composite
def plan_args(draw):
    lengths = draw(lengths_st)
    oversize = draw(st.sampled_from(["error", "own_batch"]))
    longest = max(lengths, default=1)
    low = longest if oversize == "error" else 1
    budget = draw(st.one_of(st.integers(low, max(low, 2 * longest)), st.integers(low, low + 10 * longest)))
    return dict(lengths=lengths, token_budget=budget, world_size=draw(st.integers(1, 8)), oversize=oversize,
                equalize=draw(st.booleans()))


# ---------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------


@needs_ext
@PROPERTY_SETTINGS
@given(plan_args())
def test_cpp_matches_reference(args):
    assert_same_plan(plan_microbatches(**args, impl="cpp"), plan_microbatches_ref(**args))


@needs_ext
@PROPERTY_SETTINGS
@given(st.lists(st.integers(1, 6), min_size=2, max_size=16), st.integers(0, 6), st.integers(2, 4))
def test_cpp_matches_reference_on_small_tied_cases(lengths, slack, world_size):
    """Few sequences, equal lengths, tight budgets: ties at every step, and short ranks to equalize.
    Scaling every length and the budget changes no comparison, so the plan must not change; scaled past
    2^17 tokens the C++ KK takes its binary heap instead of its per-diff buckets, so both meet the same ties."""
    budget = max(lengths) + slack
    plan = plan_microbatches(lengths, budget, world_size)
    assert_same_plan(plan, plan_microbatches_ref(lengths, budget, world_size))
    scale = 100_000
    scaled = plan_microbatches([n * scale for n in lengths], budget * scale, world_size)
    for field in ("order", "mb_offsets", "rank_offsets"):
        np.testing.assert_array_equal(getattr(scaled, field), getattr(plan, field))
    np.testing.assert_array_equal(scaled.mb_tokens, plan.mb_tokens * scale)


@CHECK_SETTINGS
@given(plan_args())
def test_plan_invariants(args):
    impl = "cpp" if pk._ext is not None else "python"
    plan = plan_microbatches(**args, impl=impl)
    lengths = np.asarray(args["lengths"], dtype=np.int64)
    n, w, budget = len(lengths), args["world_size"], args["token_budget"]
    # layout
    assert len(plan.rank_offsets) == w + 1 and plan.rank_offsets[0] == 0
    assert plan.rank_offsets[-1] == len(plan.mb_tokens) == len(plan.mb_offsets) - 1
    assert np.all(np.diff(plan.rank_offsets) >= 0) and np.all(np.diff(plan.mb_offsets) >= 0)
    assert plan.mb_offsets[0] == 0 and plan.mb_offsets[-1] == n
    # every sequence exactly once; tokens add up
    np.testing.assert_array_equal(np.sort(plan.order), np.arange(n))
    sizes = np.diff(plan.mb_offsets)
    cumulative = np.concatenate([[0], np.cumsum(lengths[plan.order])])
    np.testing.assert_array_equal(cumulative[plan.mb_offsets[1:]] - cumulative[plan.mb_offsets[:-1]], plan.mb_tokens)
    # budget: only a sequence longer than the budget, alone, may exceed it
    over = plan.mb_tokens > budget
    assert np.all(sizes[over] == 1) and np.all(lengths[plan.order[plan.mb_offsets[:-1][over]]] > budget)
    # inside a micro-batch, members stay in (length desc, index asc) order (a split keeps subsequences)
    for r in range(w):
        for mb in plan.microbatches(r):
            keys = [(-lengths[i], i) for i in mb]
            assert keys == sorted(keys)
    if args["equalize"]:
        assert len(set(np.diff(plan.rank_offsets).tolist())) <= 1
    # rank balance: the KK difference of a union of two partitions is at most the larger of theirs
    # (new_i - new_j = (a_i - a_j) + (b_(W-1-i) - b_(W-1-j)), the two terms of opposite signs), and a
    # singleton's difference is its length, so max rank tokens - min rank tokens <= the longest sequence.
    ranks = plan.rank_tokens()
    assert ranks.sum() == lengths.sum()
    assert ranks.max() - ranks.min() <= max(lengths, default=0)
    assert np.all(np.diff(ranks) <= 0)  # ranks come in order of tokens, most first
    assert_same_plan(plan, plan_microbatches(**args, impl=impl))  # deterministic


@CHECK_SETTINGS
@given(plan_args())
def test_first_fit_and_equalize_structure(args):
    """First fit: for two micro-batches i < j of a rank, j's first sequence did not fit in i, so
    tokens_i + tokens_j > budget. Equalize: same ranks' sequences, M = the largest count without it."""
    impl = "cpp" if pk._ext is not None else "python"
    args = {**args, "equalize": False}
    plain = plan_microbatches(**args, impl=impl)
    for r in range(plain.world_size):
        tokens = plain.mb_tokens[plain.rank_offsets[r] : plain.rank_offsets[r + 1]]
        pair_sums = tokens[:, None] + tokens[None, :]
        assert np.all(pair_sums[np.triu_indices(len(tokens), k=1)] > args["token_budget"])
    even = plan_microbatches(**{**args, "equalize": True}, impl=impl)
    counts = np.diff(plain.rank_offsets)
    assert np.all(np.diff(even.rank_offsets) == counts.max())
    for r in range(plain.world_size):
        assert rank_sequences(plain, r) == rank_sequences(even, r)
        if counts[r] == counts.max():  # nothing to split on the fullest ranks
            assert as_lists(plain)[r] == as_lists(even)[r]


@needs_ext
@pytest.mark.parametrize("dist", ["chat", "rl", "short", "huge"])
def test_cpp_matches_reference_at_scale(dist):
    """Thousands of sequences: many tied differences in the KK heap, bin trees that grow, splits."""
    rng = np.random.default_rng(7)
    n = 5000
    lengths = {
        "chat": np.minimum(rng.lognormal(np.log(300), 1.0, n).astype(np.int64) + 1, 4096),
        "rl": rng.integers(50, 1025, n),
        "short": rng.integers(20, 121, n),
        "huge": rng.integers(1, 10**9, n),  # KK through the binary heap
    }[dist]
    budget = int(lengths.max()) * 3 if dist == "huge" else 2048  # chat: a few sequences over the budget
    for world_size in (1, 3, 8):
        args = dict(token_budget=budget, world_size=world_size, oversize="own_batch")
        assert_same_plan(plan_microbatches(lengths, **args), plan_microbatches_ref(lengths, **args))


# ---------------------------------------------------------------------------------------------------------
# The parity test can fail: each mutant below changes one tie-break or rule of the reference, and the
# input beside it (hand-checked in the cases further down) then gives a different plan from the C++ one.
# ---------------------------------------------------------------------------------------------------------


def _anti_stable_combine(a, b, world_size, next_):
    a_desc = a + [pk._EMPTY] * (world_size - len(a))
    b_asc = [pk._EMPTY] * (world_size - len(b)) + b[::-1]
    merged = [s for s in (pk._join(x, y, next_) for x, y in zip(a_desc, b_asc)) if s[0] > 0]
    return [s for _, s in sorted(enumerate(merged), key=lambda p: (-p[1][0], -p[0]))]  # equal sums reversed


def _unreversed_combine(a, b, world_size, next_):
    a_desc = a + [pk._EMPTY] * (world_size - len(a))
    b_desc = b + [pk._EMPTY] * (world_size - len(b))  # B desc, not asc
    return sorted((s for s in (pk._join(x, y, next_) for x, y in zip(a_desc, b_desc)) if s[0] > 0),
                  key=lambda s: -s[0])


def _split_ties_to_second(members, lengths):
    halves, tokens = ([], []), [0, 0]
    for i in members:
        side = 0 if tokens[0] < tokens[1] else 1
        halves[side].append(i)
        tokens[side] += lengths[i]
    return halves


def _split_alternating(members, lengths):
    return members[0::2], members[1::2]


def _best_fit(lengths, items, budget):
    bins, room = [], []
    for i in items:
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if not fits:
            bins.append([i])
            room.append(budget - lengths[i])
            continue
        b = min(fits, key=lambda b: (room[b], b))
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def _equalize_last_position(bins, target, lengths):
    while len(bins) < target:
        splittable = [p for p, mb in enumerate(bins) if len(mb) >= 2]
        if not splittable:
            bins.extend([] for _ in range(target - len(bins)))
            return
        p = max(splittable, key=lambda p: (sum(lengths[i] for i in bins[p]), p))  # ties: highest position
        bins[p], second = pk._split_ref(bins[p], lengths)
        bins.append(second)


MUTANTS = [
    # (reference helper, mutant, lengths, budget, world_size)
    ("_kk_heap_key", lambda d, c: (-d, -c), [1, 1], 10, 2),  # later insertion first
    ("_kk_heap_key", lambda d, c: (-d, c if c < 3 else -c), [1, 1, 1], 10, 3),  # only merged partitions
    ("_kk_combine_ref", _anti_stable_combine, [1, 1], 10, 2),
    ("_kk_combine_ref", _unreversed_combine, [1, 1], 1, 2),
    ("_first_fit_decreasing_ref", _best_fit, [4, 2, 7, 4], 10, 1),
    ("_split_ref", _split_ties_to_second, [3, 1, 1, 1, 1], 3, 2),
    ("_split_ref", _split_alternating, [3, 2, 2, 1, 1], 4, 2),
    ("_equalize_ref", _equalize_last_position, [3, 1, 3, 3, 2, 4, 1], 4, 2),
]


@needs_ext
@pytest.mark.parametrize("helper, mutant, lengths, budget, world_size", MUTANTS)
def test_parity_check_catches_a_changed_rule(monkeypatch, helper, mutant, lengths, budget, world_size):
    fast = plan_microbatches(lengths, budget, world_size)
    assert_same_plan(fast, plan_microbatches_ref(lengths, budget, world_size))
    monkeypatch.setattr(pk, helper, mutant)
    assert not same_plan(fast, plan_microbatches_ref(lengths, budget, world_size))


# ---------------------------------------------------------------------------------------------------------
# Hand-worked cases (both implementations)
# ---------------------------------------------------------------------------------------------------------

IMPLS = [pytest.param("cpp", marks=needs_ext), "python"]


@pytest.mark.parametrize("impl", IMPLS)
def test_kk_classic_case(impl):
    # [8, 7, 6, 5, 4], W=2. Partitions as (sums desc; members), heap key (diff, counter):
    #   start  {0}8 (8,c0)  {1}7 (7,c1)  {2}6 (6,c2)  {3}5 (5,c3)  {4}4 (4,c4)
    #   {0}8 + {1}7: [8|0] with B asc [0|7]           -> [{0}8, {1}7]     (1,c5)
    #   {2}6 + {3}5                                   -> [{2}6, {3}5]     (1,c6)
    #   {4}4 + c5 (diff 1, earlier than c6): [4|0] + [7|8] -> [{4,1}11, {0}8]   (3,c7)
    #   c7 + c6: [11|8] + [5|6]                       -> [{4,1,3}16, {0,2}14]
    # Rank 0 = {1,3,4} (16 tokens), rank 1 = {0,2} (14): the textbook case where KK misses 15/15.
    plan = plan_microbatches([8, 7, 6, 5, 4], 100, 2, impl=impl)
    assert as_lists(plan) == [[[1, 3, 4]], [[0, 2]]]
    np.testing.assert_array_equal(plan.rank_tokens(), [16, 14])


@pytest.mark.parametrize("impl", IMPLS)
def test_kk_combines_b_ascending_and_sorts_stably(impl):
    # [1, 1, 1], W=3: {0} + {1}: [1|0|0] with B asc [0|0|1] -> [{0}1, {}0, {1}1] -> stable -> [{0}, {1}, {}]
    # (diff 1, c3). Then {2} (diff 1, c2 < c3) + that: [1|0|0] + [0|1|1] -> [{2}, {1}, {0}], all 1: kept in
    # that order. So rank 0 gets sequence 2 and rank 2 gets sequence 0.
    assert as_lists(plan_microbatches([1, 1, 1], 10, 3, impl=impl)) == [[[2]], [[1]], [[0]]]
    assert as_lists(plan_microbatches([1, 1], 10, 2, impl=impl)) == [[[0]], [[1]]]  # equal sums: A's first


@pytest.mark.parametrize("impl", IMPLS)
def test_first_fit_is_not_best_fit(impl):
    # [4, 2, 7, 4], budget 10, W=1. Sorted: 7 (#2), 4 (#0), 4 (#3), 2 (#1).
    # 7 -> bin 0 (room 3); 4 -> bin 1 (room 6); 4 -> bin 1 (room 2); 2 fits bin 0 (room 3) and bin 1 (room 2):
    # first fit takes bin 0, best fit would take bin 1.
    plan = plan_microbatches([4, 2, 7, 4], 10, impl=impl)
    assert as_lists(plan) == [[[2, 1], [0, 3]]]
    np.testing.assert_array_equal(plan.mb_tokens, [9, 8])


@pytest.mark.parametrize("impl", IMPLS)
def test_equalize_splits_to_the_lighter_half(impl):
    # [3, 2, 2, 1, 1], budget 4, W=2. KK: {0}3+{1}2 -> [3, 2] (1,c5); {2}2+{3}1 -> [2, 1] (1,c6);
    # {4}1 + c5: [1|0] + [2|3] -> [{4,1}3, {0}3] (0,c7); c6 + c7: [2|1] + [3|3] -> [{2,0}5, {3,4,1}4].
    # Rank 0 {0,2}: 3 and 2 do not share a bin of 4 -> [[0], [2]]. Rank 1: [[1, 3, 4]], one bin short.
    # Split [1, 3, 4] (2, 1, 1 tokens): 1 -> first (tie), 3 -> second (2 > 0), 4 -> second (1 < 2).
    plan = plan_microbatches([3, 2, 2, 1, 1], 4, 2, impl=impl)
    assert as_lists(plan) == [[[0], [2]], [[1], [3, 4]]]
    assert as_lists(plan_microbatches([3, 2, 2, 1, 1], 4, 2, equalize=False, impl=impl)) == [[[0], [2]], [[1, 3, 4]]]


@pytest.mark.parametrize("impl", IMPLS)
def test_equalize_ties_go_to_the_first_bin_and_lowest_position(impl):
    # [3, 1, 1, 1, 1], budget 3, W=2: ranks {0,4} -> [[0], [4]] and {1,2,3} -> [[1, 2, 3]]. Split with
    # ties to the first half: 1 -> first, 2 -> second, 3 -> first (1 == 1).
    assert as_lists(plan_microbatches([3, 1, 1, 1, 1], 3, 2, impl=impl)) == [[[0], [4]], [[1, 3], [2]]]
    # [3, 1, 3, 3, 2, 4, 1], budget 4, W=2: ranks {3,4,5} -> [[5], [3], [4]] (3 bins) and {0,1,2,6} ->
    # [[0, 1], [2, 6]] (4 and 4 tokens). The tie goes to position 0: [0, 1] splits, [0] stays in place.
    plan = plan_microbatches([3, 1, 3, 3, 2, 4, 1], 4, 2, impl=impl)
    assert as_lists(plan) == [[[5], [3], [4]], [[0], [2, 6], [1]]]


@pytest.mark.parametrize("impl", IMPLS)
def test_equalize_pads_with_empty_microbatches(impl):
    # [9, 3, 3, 3], budget 6, W=2: KK gives ranks {1,2,3} (9) and {0} (9). Rank 0 packs [[1, 2], [3]];
    # rank 1's only sequence is oversize (own micro-batch) and cannot split, so it gets an empty one.
    plan = plan_microbatches([9, 3, 3, 3], 6, 2, oversize="own_batch", impl=impl)
    assert as_lists(plan) == [[[1, 2], [3]], [[0], []]]
    np.testing.assert_array_equal(plan.mb_tokens, [6, 3, 9, 0])
    assert plan.pad_fraction() == pytest.approx(1 - 18 / (4 * 6))


@pytest.mark.parametrize("impl", IMPLS)
def test_oversize_own_batch_opens_a_closed_microbatch(impl):
    # budget 5: 9 and 7 each alone (in sorted order), then first fit of 3, 2, 2 from a fresh bin.
    plan = plan_microbatches([2, 9, 3, 7, 2], 5, oversize="own_batch", impl=impl)
    assert as_lists(plan) == [[[1], [3], [2, 0], [4]]]


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_tiny_inputs(impl):
    plan = plan_microbatches([], 16, 4, impl=impl)
    assert plan.order.shape == (0,) and plan.num_microbatches() == 0
    np.testing.assert_array_equal(plan.rank_offsets, [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(plan.mb_offsets, [0])
    assert plan.pad_fraction() == 0.0 and plan.rank_tokens().tolist() == [0, 0, 0, 0]
    # fewer sequences than ranks: the empty ranks get empty micro-batches (equalize) or none
    assert as_lists(plan_microbatches([5, 3], 8, 3, impl=impl)) == [[[0]], [[1]], [[]]]
    assert as_lists(plan_microbatches([5, 3], 8, 3, equalize=False, impl=impl)) == [[[0]], [[1]], []]


def test_plan_helpers():
    plan = plan_microbatches([3, 2, 2, 1, 1], 4, 2, impl="python")  # [[[0], [2]], [[1], [3, 4]]]
    assert plan.num_microbatches() == 4 and plan.num_microbatches(1) == 2
    np.testing.assert_array_equal(plan.rank_tokens(), [5, 4])
    assert plan.total_tokens == 9
    assert plan.fill_fraction() == pytest.approx(9 / 16)
    assert plan.pad_fraction() == pytest.approx(7 / 16)
    with pytest.raises(ValueError):
        plan.order[0] = 1  # read-only


# ---------------------------------------------------------------------------------------------------------
# Inputs and errors
# ---------------------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint16, np.uint64, np.int64])
def test_integer_arrays_and_lists_agree(dtype):
    lengths = [5, 1, 4, 4, 2, 7, 3]
    expected = plan_microbatches(lengths, 8, 2)
    assert_same_plan(plan_microbatches(np.asarray(lengths, dtype=dtype), 8, 2), expected)
    order, *_ = pk._ext.plan(np.asarray(lengths, dtype=dtype), 8, 2, False, True)  # the extension alone
    np.testing.assert_array_equal(order, expected.order)
    assert_same_plan(PackPlan(*pk._ext.plan(lengths, 8, 2, False, True), 8, 2), expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_oversize_error_names_sequence_length_budget_and_fix(impl):
    lengths = [100] * 17 + [9000, 9500]
    with pytest.raises(ValueError) as info:
        plan_microbatches(lengths, 8192, 2, impl=impl)
    message = str(info.value)
    assert "sequence 17 " in message and "9000" in message and "8192" in message
    assert "raise the budget" in message and "oversize='own_batch'" in message


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "lengths, words",
    [
        ([4, 0, 2], ["sequence 1 ", "0 tokens", "at least 1"]),
        ([4, 3, -2], ["sequence 2 ", "-2 tokens"]),
        ([4, 2.5, 2], ["sequence 1 ", "2.5", "integer"]),
        (np.array([4.0, 3.0, 2.5]), ["sequence 2 ", "2.5", "integer"]),
        (np.array([4.0, 3.0]), ["sequence 0 ", "integer"]),
        ([4, "3"], ["sequence 1 ", "integer"]),
        (np.array([True, False]), ["sequence 0 ", "integer"]),
        ([[1, 2], [3, 4]], ["1-D"]),
    ],
)
def test_bad_lengths(impl, lengths, words):
    with pytest.raises(ValueError) as info:
        plan_microbatches(lengths, 8, 2, impl=impl)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(token_budget=0), ["token_budget", ">= 1"]),
        (dict(token_budget=8.0), ["token_budget", "integer"]),
        (dict(world_size=0), ["world_size", ">= 1"]),
        (dict(oversize="truncate"), ["oversize", "own_batch"]),
        (dict(impl="gpu"), ["impl", "cpp"]),
    ],
)
def test_bad_options(kwargs, words):
    args = dict(lengths=[3, 4], token_budget=8, world_size=2) | kwargs
    with pytest.raises(ValueError) as info:
        plan_microbatches(**args)
    assert all(w in str(info.value) for w in words), str(info.value)


@needs_ext
def test_extension_checks_its_own_input():
    for bad in (([3, 9], 8, 1, False), ([3, 0], 8, 1, True), ([3, 1], 0, 1, True), ([3, 1], 8, 0, True)):
        with pytest.raises(ValueError):
            pk._ext.plan(*bad, True)
    with pytest.raises(ValueError, match="integers"):
        pk._ext.plan(np.array([2.5, 1.0]), 8, 1, False, True)  # refused, not truncated
    with pytest.raises(ValueError, match="at least 1"):
        pk._ext.metadata([2, 0])


# ---------------------------------------------------------------------------------------------------------
# Micro-batch metadata and the padding baseline
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_metadata_hand_case(impl):
    cu_seqlens, position_ids, padded_index = microbatch_metadata([3, 1, 2], impl=impl)
    assert cu_seqlens.dtype == np.int32 and position_ids.dtype == padded_index.dtype == np.int64
    np.testing.assert_array_equal(cu_seqlens, [0, 3, 4, 6])
    np.testing.assert_array_equal(position_ids, [0, 1, 2, 0, 0, 1])
    np.testing.assert_array_equal(padded_index, [0, 1, 2, 3, 6, 7])  # rows of 3: (0,0..2) (1,0) (2,0..1)


@pytest.mark.parametrize("impl", IMPLS)
def test_metadata_empty_microbatch(impl):
    cu_seqlens, position_ids, padded_index = microbatch_metadata([], impl=impl)
    np.testing.assert_array_equal(cu_seqlens, [0])
    assert position_ids.shape == padded_index.shape == (0,)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=30))
def test_metadata_matches_reference_and_scatters_back(lengths):
    expected = microbatch_metadata_ref(lengths)
    if pk._ext is not None:
        for got, want in zip(microbatch_metadata(lengths), expected):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
    # scattering packed per-token values through padded_index rebuilds each sequence in its own row
    cu_seqlens, position_ids, padded_index = expected
    packed = np.arange(1, sum(lengths) + 1)
    padded = np.zeros((len(lengths), max(lengths, default=0)), dtype=packed.dtype)
    padded.reshape(-1)[padded_index] = packed
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(padded[row, :n], packed[cu_seqlens[row] : cu_seqlens[row + 1]])
        assert not padded[row, n:].any()
        np.testing.assert_array_equal(position_ids[cu_seqlens[row] : cu_seqlens[row + 1]], np.arange(n))


def test_padded_to_longest_pad_fraction():
    # batches of 2 in data order: [1, 3] -> 2 rows x 3, [2, 2] -> 2 x 2, [5] -> 1 x 5; 13 tokens in 15 slots
    assert padded_to_longest_pad_fraction([1, 3, 2, 2, 5], 2) == pytest.approx(1 - 13 / 15)
    assert padded_to_longest_pad_fraction([4, 4, 4], 64) == 0.0
    assert padded_to_longest_pad_fraction([], 64) == 0.0
