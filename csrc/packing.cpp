// Packed-sequence batcher: the fast path of srppo_fast/packing.py (plan_microbatches, microbatch_metadata).
//
// The spec, and the pure-Python reference that must give identical arrays, live in srppo_fast/packing.py.
// Steps, as numbered there:
//   1. sort sequences by (length desc, index asc)
//   2. Karmarkar-Karp largest differencing: W-way rank balancing by tokens
//   3. first-fit-decreasing inside each rank (a max segment tree finds the first bin with room)
//   4. equalize: split the heaviest micro-batches of short ranks until every rank has the same count
// Shape letters: N sequences, W ranks (world size), M micro-batches, T packed tokens of one micro-batch.
// Plain int64 numpy arrays in and out; the GIL is released while planning.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using i64 = int64_t;
using Vec = std::vector<i64>;

// ---------------------------------------------------------------------------------------------
// 0. Validation (the Python wrapper checks first and words the errors for users; these are the backstop)
// ---------------------------------------------------------------------------------------------

void check_plan_args(const i64* len, i64 n, i64 budget, i64 world_size, bool own_batch) {
  if (budget < 1) throw std::invalid_argument("token_budget must be >= 1, got " + std::to_string(budget));
  if (world_size < 1) throw std::invalid_argument("world_size must be >= 1, got " + std::to_string(world_size));
  for (i64 i = 0; i < n; ++i) {
    if (len[i] < 1)
      throw std::invalid_argument("sequence " + std::to_string(i) + " has " + std::to_string(len[i]) +
                                  " tokens; every sequence needs at least 1 token");
    if (!own_batch && len[i] > budget)
      throw std::invalid_argument("sequence " + std::to_string(i) + " has " + std::to_string(len[i]) +
                                  " tokens, more than the micro-batch token budget " + std::to_string(budget) +
                                  ": raise the budget or pass oversize='own_batch'");
  }
}

// ---------------------------------------------------------------------------------------------
// 1. Sort: indices by (length desc, index asc)
// ---------------------------------------------------------------------------------------------

struct Sorted {
  Vec index;   // [N] sequence indices by (length desc, index asc)
  Vec length;  // [N] their lengths, so later steps read lengths in order instead of gathering them
};

// Stable counting sort when the largest length is small against N (token counts usually are), else std::sort.
Sorted sort_by_length_desc(const i64* len, i64 n) {
  Sorted out{Vec(n), Vec(n)};
  i64 max_len = 0;
  for (i64 i = 0; i < n; ++i) max_len = std::max(max_len, len[i]);
  if (max_len <= std::max<i64>(4 * n, 1 << 16)) {
    Vec start(max_len + 2, 0);  // start[max_len - L] = first slot of length L (longest first)
    for (i64 i = 0; i < n; ++i) ++start[max_len - len[i] + 1];
    for (i64 b = 1; b <= max_len + 1; ++b) start[b] += start[b - 1];
    for (i64 i = 0; i < n; ++i) {
      i64 j = start[max_len - len[i]]++;
      out.index[j] = i;
      out.length[j] = len[i];
    }
    return out;
  }
  for (i64 i = 0; i < n; ++i) out.index[i] = i;
  std::sort(out.index.begin(), out.index.end(),
            [len](i64 a, i64 b) { return len[a] > len[b] || (len[a] == len[b] && a < b); });
  for (i64 j = 0; j < n; ++j) out.length[j] = len[out.index[j]];
  return out;
}

// ---------------------------------------------------------------------------------------------
// 2. Karmarkar-Karp largest differencing for W ranks
// ---------------------------------------------------------------------------------------------
// A partition is W subsets kept in descending order of sum (stable). Only its non-empty subsets are stored
// (sums are >= 1, so empties always sit at the end); a singleton partition is not stored at all until it is
// popped. Sequences are named by their sorted position j. Members are not listed: a subset is named by its
// first member, and each union x U y is logged as (x, y); walking the log backwards hands every member the
// rank of its subset's first member. (The reference lists members, x's then y's; the sets are the same.)

struct Subset {
  i64 sum;
  i64 first;  // sorted position of its first member; -1 when empty
};

struct Waiting {  // a merged partition waiting to be merged again
  i64 diff;       // largest subset sum - smallest (an empty subset counts as 0)
  i64 counter;    // insertion counter: earlier first on equal diff
  i64 offset;     // its subsets in the arena
  i64 k;          // number of non-empty subsets
};

// Merged partitions by (diff desc, counter asc): a binary heap, for any lengths.
class HeapQueue {
 public:
  bool empty() const { return heap_.empty(); }
  const Waiting& top() const { return heap_.front(); }
  void pop() {
    std::pop_heap(heap_.begin(), heap_.end(), after);
    heap_.pop_back();
  }
  void push(const Waiting& w) {
    heap_.push_back(w);
    std::push_heap(heap_.begin(), heap_.end(), after);
  }

 private:
  static bool after(const Waiting& a, const Waiting& b) {  // a comes out after b
    return a.diff < b.diff || (a.diff == b.diff && a.counter > b.counter);
  }
  std::vector<Waiting> heap_;
};

// The same order, when diffs are small integers: a FIFO per diff (pushes come in counter order, so FIFO order
// is counter order) and a bitmap of non-empty diffs, 64 to a word, with levels above it to find the largest
// set bit in O(levels). A merge never makes a diff larger than the largest length, so [0, max_len] suffices.
class BucketQueue {
 public:
  explicit BucketQueue(i64 max_diff) : head_(max_diff + 1, -1), tail_(max_diff + 1, -1) {
    i64 bits = max_diff + 1;
    do {
      levels_.emplace_back((bits + 63) / 64, 0);
      bits = (bits + 63) / 64;
    } while (bits > 1);
  }
  bool empty() const { return levels_.back()[0] == 0; }
  const Waiting& top() const { return nodes_[head_[top_diff()]]; }
  void pop() {
    i64 d = top_diff();
    i64 id = head_[d];
    head_[d] = next_[id];
    if (head_[d] < 0) {
      tail_[d] = -1;
      clear_bit(d);
    }
    free_.push_back(id);
  }
  void push(const Waiting& w) {
    if (w.diff < 0 || w.diff >= static_cast<i64>(head_.size())) throw std::logic_error("diff out of range");
    i64 id = new_node(w);
    if (tail_[w.diff] < 0) {
      head_[w.diff] = id;
      set_bit(w.diff);
    } else {
      next_[tail_[w.diff]] = id;
    }
    tail_[w.diff] = id;
  }

 private:
  i64 top_diff() const {  // the largest non-empty diff: the highest set bit, level by level down
    i64 idx = 0;
    for (size_t l = levels_.size(); l-- > 0;) idx = idx * 64 + 63 - __builtin_clzll(levels_[l][idx]);
    return idx;
  }
  void set_bit(i64 d) {
    for (auto& level : levels_) {
      uint64_t was = level[d / 64];
      level[d / 64] = was | (uint64_t{1} << (d % 64));
      if (was) return;  // the levels above already have it
      d /= 64;
    }
  }
  void clear_bit(i64 d) {
    for (auto& level : levels_) {
      level[d / 64] &= ~(uint64_t{1} << (d % 64));
      if (level[d / 64]) return;
      d /= 64;
    }
  }
  i64 new_node(const Waiting& w) {
    if (free_.empty()) {
      nodes_.push_back(w);
      next_.push_back(-1);
      return static_cast<i64>(nodes_.size()) - 1;
    }
    i64 id = free_.back();
    free_.pop_back();
    nodes_[id] = w;
    next_[id] = -1;
    return id;
  }
  std::vector<std::vector<uint64_t>> levels_;  // levels_[0]: one bit per diff; levels_[l + 1]: one per word of l
  Vec head_, tail_;                            // [max_diff + 1]: FIFO ends (node ids), -1 when empty
  std::vector<Waiting> nodes_;
  Vec next_;  // [nodes]: FIFO links
  Vec free_;  // recycled node ids
};

// Blocks of k subsets, recycled per size k, so live storage stays O(N) and never O(N * W).
class SubsetArena {
 public:
  explicit SubsetArena(i64 world_size) : free_(world_size + 1) {}
  i64 alloc(i64 k) {
    if (!free_[k].empty()) {
      i64 off = free_[k].back();
      free_[k].pop_back();
      return off;
    }
    i64 off = static_cast<i64>(pool_.size());
    pool_.resize(pool_.size() + k);
    return off;
  }
  void release(i64 off, i64 k) { free_[k].push_back(off); }
  Subset* at(i64 off) { return pool_.data() + off; }

 private:
  std::vector<Subset> pool_;
  std::vector<Vec> free_;
};

using JoinLog = std::vector<std::pair<i64, i64>>;  // (x.first, y.first) of every union x U y, in order

Subset join(const Subset& x, const Subset& y, JoinLog& log) {
  if (x.first < 0) return y;
  if (y.first < 0) return x;
  log.emplace_back(x.first, y.first);
  return {x.sum + y.sum, x.first};
}

// new_i = a_desc[i] U b_asc[i] for i in 0..W-1, keeping non-empty ones in i order, then stable sort by sum desc.
// a: [ka] desc, b: [kb] desc (so b_asc[i] = b[W-1-i] where that exists). Returns the count written to out.
i64 combine(const Subset* a, i64 ka, const Subset* b, i64 kb, i64 world_size, JoinLog& log, Subset* out) {
  const Subset empty{0, -1};
  i64 k = 0;
  for (i64 i = 0; i < ka; ++i) out[k++] = join(a[i], i >= world_size - kb ? b[world_size - 1 - i] : empty, log);
  for (i64 i = std::max(ka, world_size - kb); i < world_size; ++i) out[k++] = b[world_size - 1 - i];
  auto by_sum_desc = [](const Subset& x, const Subset& y) { return x.sum > y.sum; };
  if (k <= 32) {  // insertion sort: stable, and k is usually tiny
    for (i64 i = 1; i < k; ++i)
      for (i64 j = i; j > 0 && by_sum_desc(out[j], out[j - 1]); --j) std::swap(out[j], out[j - 1]);
  } else {
    std::stable_sort(out, out + k, by_sum_desc);
  }
  return k;
}

// Rank of every sequence, indexed by sorted position; ranks ordered by token sum desc.
// length: [N] lengths by (length desc, index asc), which is also the singletons' heap order, so the singletons
// are read from it as a queue and only merged partitions go through `queue`.
template <typename Queue>
Vec karmarkar_karp_ranks(const Vec& length, i64 world_size, Queue& queue) {
  const i64 n = static_cast<i64>(length.size());
  JoinLog log;
  log.reserve(n);
  SubsetArena arena(world_size);
  std::vector<Subset> a(world_size), b(world_size), merged(world_size);
  i64 next_single = 0;  // its insertion counter is its sorted position
  // Pop the partition with the largest (diff, -counter) into dst; returns its subset count.
  auto pop = [&](Subset* dst) -> i64 {
    // On equal diff the singleton wins: its counter < N <= any merged counter.
    if (next_single < n && (queue.empty() || length[next_single] >= queue.top().diff)) {
      dst[0] = {length[next_single], next_single};
      ++next_single;
      return 1;
    }
    Waiting w = queue.top();
    queue.pop();
    std::copy(arena.at(w.offset), arena.at(w.offset) + w.k, dst);
    arena.release(w.offset, w.k);
    return w.k;
  };
  i64 counter = n;
  for (i64 live = n; live > 1; --live) {
    i64 ka = pop(a.data());
    i64 kb = pop(b.data());
    i64 k = combine(a.data(), ka, b.data(), kb, world_size, log, merged.data());
    i64 off = arena.alloc(k);
    std::copy(merged.begin(), merged.begin() + k, arena.at(off));
    queue.push({merged[0].sum - (k < world_size ? 0 : merged[k - 1].sum), counter++, off, k});
  }
  Vec rank(n, -1);
  i64 k = pop(a.data());  // the last partition: subsets desc by sum are ranks 0..k-1, the rest stay empty
  for (i64 r = 0; r < k; ++r) rank[a[r].first] = r;
  for (auto it = log.rbegin(); it != log.rend(); ++it) rank[it->second] = rank[it->first];
  return rank;
}

Vec karmarkar_karp_ranks(const Vec& length, i64 world_size) {
  const i64 n = static_cast<i64>(length.size());
  if (world_size == 1 || n == 0) return Vec(n, 0);
  if (length[0] <= std::max<i64>(2 * n, 1 << 17)) {  // diffs <= the longest length; bucket memory stays O(N)
    BucketQueue queue(length[0]);
    return karmarkar_karp_ranks(length, world_size, queue);
  }
  HeapQueue queue;
  return karmarkar_karp_ranks(length, world_size, queue);
}

// ---------------------------------------------------------------------------------------------
// 3. First-fit-decreasing inside a rank
// ---------------------------------------------------------------------------------------------

struct Bin {
  i64 start;   // first member in RankBins::members
  i64 size;    // number of sequences
  i64 tokens;  // sum of their lengths
};

struct RankBins {
  Vec members;            // sequence indices, bin by bin (each bin's members contiguous, insertion order)
  std::vector<Bin> bins;  // in micro-batch position order
};

// Max segment tree over bins' remaining capacity. Unopened bins hold the full budget, so the first bin with
// room is either an open bin or the next one to open. Doubles its leaves when they run out.
class FirstFitTree {
 public:
  FirstFitTree(i64 leaves, i64 budget) : budget_(budget) { rebuild(leaves, {}); }
  // Lowest-numbered bin whose remaining capacity >= need (need <= budget).
  i64 first_fit(i64 need) {
    if (tree_[1] < need) grow();
    i64 node = 1;
    while (node < size_) node = 2 * node + (tree_[2 * node] < need);  // left child when it has room
    return node - size_;
  }
  void set(i64 bin, i64 remaining) {
    if (bin >= size_) grow();
    i64 node = bin + size_;
    tree_[node] = remaining;
    for (node /= 2; node >= 1; node /= 2) {
      i64 best = std::max(tree_[2 * node], tree_[2 * node + 1]);
      if (tree_[node] == best) break;  // unchanged here, so unchanged above
      tree_[node] = best;
    }
  }
  i64 remaining(i64 bin) const { return tree_[bin + size_]; }

 private:
  void grow() { rebuild(2 * size_, Vec(tree_.begin() + size_, tree_.end())); }
  void rebuild(i64 leaves, const Vec& old) {
    size_ = 1;
    while (size_ < leaves) size_ *= 2;
    tree_.assign(2 * size_, budget_);
    std::copy(old.begin(), old.end(), tree_.begin() + size_);
    for (i64 node = size_ - 1; node >= 1; --node) tree_[node] = std::max(tree_[2 * node], tree_[2 * node + 1]);
  }
  i64 budget_;
  i64 size_ = 1;
  Vec tree_;  // [2 * size_]: node 1 is the root, leaves at size_ .. 2 * size_ - 1
};

// items: [n_r] sequence indices of one rank by (length desc, index asc); item_len: [n_r] their lengths.
// A sequence longer than the budget (only with own_batch) opens a bin of its own that nothing else joins.
RankBins first_fit_decreasing(const Vec& items, const Vec& item_len, i64 budget) {
  FirstFitTree tree(std::min<i64>(64, static_cast<i64>(items.size()) + 1), budget);  // doubles as bins open
  Vec bin_of(items.size());
  i64 n_bins = 0;
  for (size_t j = 0; j < items.size(); ++j) {
    i64 need = item_len[j];
    i64 bin = need > budget ? n_bins : tree.first_fit(need);
    tree.set(bin, need > budget ? 0 : tree.remaining(bin) - need);
    n_bins = std::max(n_bins, bin + 1);
    bin_of[j] = bin;
  }
  RankBins out;  // bucket items by bin, keeping insertion order
  out.bins.assign(n_bins, Bin{0, 0, 0});
  for (size_t j = 0; j < items.size(); ++j) {
    ++out.bins[bin_of[j]].size;
    out.bins[bin_of[j]].tokens += item_len[j];
  }
  for (i64 b = 1; b < n_bins; ++b) out.bins[b].start = out.bins[b - 1].start + out.bins[b - 1].size;
  Vec fill(n_bins, 0);
  out.members.resize(items.size());
  for (size_t j = 0; j < items.size(); ++j) out.members[out.bins[bin_of[j]].start + fill[bin_of[j]]++] = items[j];
  return out;
}

// ---------------------------------------------------------------------------------------------
// 4. Equalize micro-batch counts across ranks
// ---------------------------------------------------------------------------------------------

// Split bin `pos` in place: each member (in order) goes to the lighter of two new bins (ties: the first).
// The first new bin keeps position pos, the second is appended. Both reuse the old bin's slice of members.
void split_bin(RankBins& rb, size_t pos, const i64* len, Vec& first, Vec& second) {
  Bin old = rb.bins[pos];
  first.clear();
  second.clear();
  i64 t1 = 0, t2 = 0;
  for (i64 j = old.start; j < old.start + old.size; ++j) {
    i64 i = rb.members[j];
    if (t1 <= t2) {
      first.push_back(i);
      t1 += len[i];
    } else {
      second.push_back(i);
      t2 += len[i];
    }
  }
  std::copy(first.begin(), first.end(), rb.members.begin() + old.start);
  std::copy(second.begin(), second.end(), rb.members.begin() + old.start + first.size());
  i64 n1 = static_cast<i64>(first.size());
  rb.bins[pos] = {old.start, n1, t1};
  rb.bins.push_back({old.start + n1, old.size - n1, t2});
}

// Split the heaviest splittable bin (>= 2 members; ties: lowest position) until `target` bins, then pad with
// empty bins. A heap of (tokens, -position) stands in for the reference's linear scan: only the popped bin
// changes, so the heap never holds a stale entry.
void equalize(RankBins& rb, i64 target, const i64* len) {
  using Key = std::pair<i64, i64>;  // (tokens, -position): max-heap order = heaviest, then lowest position
  std::vector<Key> heap;
  for (size_t p = 0; p < rb.bins.size(); ++p)
    if (rb.bins[p].size >= 2) heap.push_back({rb.bins[p].tokens, -static_cast<i64>(p)});
  std::make_heap(heap.begin(), heap.end());
  Vec first, second;
  while (static_cast<i64>(rb.bins.size()) < target && !heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    size_t pos = static_cast<size_t>(-heap.back().second);
    heap.pop_back();
    split_bin(rb, pos, len, first, second);
    for (size_t p : {pos, rb.bins.size() - 1}) {
      if (rb.bins[p].size < 2) continue;
      heap.push_back({rb.bins[p].tokens, -static_cast<i64>(p)});
      std::push_heap(heap.begin(), heap.end());
    }
  }
  while (static_cast<i64>(rb.bins.size()) < target) rb.bins.push_back({0, 0, 0});
}

// ---------------------------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------------------------

struct Plan {
  Vec order;         // [N] sequence indices, rank by rank, micro-batch by micro-batch
  Vec mb_offsets;    // [M + 1]
  Vec rank_offsets;  // [W + 1]
  Vec mb_tokens;     // [M]
};

Plan make_plan(const i64* len, i64 n, i64 budget, i64 world_size, bool own_batch, bool equalize_counts) {
  check_plan_args(len, n, budget, world_size, own_batch);
  Sorted sorted = sort_by_length_desc(len, n);
  Vec rank = karmarkar_karp_ranks(sorted.length, world_size);
  std::vector<Vec> items(world_size), item_len(world_size);  // in sorted order, so each rank stays sorted
  for (i64 j = 0; j < n; ++j) {
    items[rank[j]].push_back(sorted.index[j]);
    item_len[rank[j]].push_back(sorted.length[j]);
  }
  std::vector<RankBins> ranks(world_size);
  i64 most = 0;
  for (i64 r = 0; r < world_size; ++r) {
    ranks[r] = first_fit_decreasing(items[r], item_len[r], budget);
    Vec().swap(items[r]);
    Vec().swap(item_len[r]);
    most = std::max(most, static_cast<i64>(ranks[r].bins.size()));
  }
  if (equalize_counts)
    for (auto& rb : ranks) equalize(rb, most, len);
  Plan plan;
  plan.order.reserve(n);
  plan.mb_offsets.push_back(0);
  plan.rank_offsets.push_back(0);
  for (const auto& rb : ranks) {
    for (const Bin& bin : rb.bins) {
      plan.order.insert(plan.order.end(), rb.members.begin() + bin.start, rb.members.begin() + bin.start + bin.size);
      plan.mb_offsets.push_back(static_cast<i64>(plan.order.size()));
      plan.mb_tokens.push_back(bin.tokens);
    }
    plan.rank_offsets.push_back(static_cast<i64>(plan.mb_tokens.size()));
  }
  return plan;
}

// ---------------------------------------------------------------------------------------------
// Python glue
// ---------------------------------------------------------------------------------------------

using Int64Array = py::array_t<i64, py::array::c_style | py::array::forcecast>;

// A list or any integer numpy array -> contiguous int64 [N]. Floats are refused, not truncated.
Int64Array as_lengths(const py::object& obj) {
  py::array raw = py::array::ensure(obj);
  if (!raw) throw std::invalid_argument("lengths must be a list or numpy array of integers");
  char kind = raw.dtype().kind();
  if (raw.size() > 0 && kind != 'i' && kind != 'u')
    throw std::invalid_argument(std::string("lengths must be integers, got dtype kind '") + kind + "'");
  if (raw.ndim() != 1) throw std::invalid_argument("lengths must be 1-D");
  return Int64Array::ensure(raw);
}

// Hands a vector to numpy without a copy: the array's base owns it.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  if (v.empty()) return py::array_t<T>(0);
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule base(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(static_cast<py::ssize_t>(owned->size()), owned->data(), base);
}

py::tuple plan_py(const py::object& raw, i64 budget, i64 world_size, bool own_batch, bool equalize_counts) {
  Int64Array lengths = as_lengths(raw);
  const i64* len = lengths.data();
  const i64 n = lengths.shape(0);
  Plan plan;
  {
    py::gil_scoped_release no_gil;
    plan = make_plan(len, n, budget, world_size, own_batch, equalize_counts);
  }
  return py::make_tuple(to_numpy(std::move(plan.order)), to_numpy(std::move(plan.mb_offsets)),
                        to_numpy(std::move(plan.rank_offsets)), to_numpy(std::move(plan.mb_tokens)));
}

// lengths: [n] of one micro-batch -> cu_seqlens int32 [n + 1], position_ids int64 [T], padded_index int64 [T]
py::tuple metadata_py(const py::object& raw) {
  Int64Array lengths = as_lengths(raw);
  const i64* len = lengths.data();
  const i64 n = lengths.shape(0);
  i64 total = 0, max_len = 0;
  for (i64 r = 0; r < n; ++r) {
    if (len[r] < 1) throw std::invalid_argument("sequence " + std::to_string(r) + " has " + std::to_string(len[r]) +
                                                " tokens; every sequence needs at least 1 token");
    total += len[r];
    max_len = std::max(max_len, len[r]);
    if (total > std::numeric_limits<int32_t>::max())
      throw std::invalid_argument("micro-batch holds more than 2^31 - 1 tokens; cu_seqlens is int32");
  }
  py::array_t<int32_t> cu_seqlens(n + 1);
  py::array_t<i64> position_ids(total), padded_index(total);
  int32_t* cu = cu_seqlens.mutable_data();
  i64* pos = position_ids.mutable_data();
  i64* pad = padded_index.mutable_data();
  {
    py::gil_scoped_release no_gil;
    i64 t = 0;
    cu[0] = 0;
    for (i64 r = 0; r < n; ++r) {
      const i64 length = len[r], row_start = r * max_len;  // locals: the stores below may alias len
      for (i64 j = 0; j < length; ++j) {
        pos[t + j] = j;
        pad[t + j] = row_start + j;
      }
      t += length;
      cu[r + 1] = static_cast<int32_t>(t);
    }
  }
  return py::make_tuple(cu_seqlens, position_ids, padded_index);
}

}  // namespace

PYBIND11_MODULE(_packing, m) {
  m.doc() = "Packed-sequence batcher (fast path of srppo_fast.packing; the spec and reference live there).";
  m.def("plan", &plan_py, py::arg("lengths"), py::arg("budget"), py::arg("world_size"), py::arg("own_batch"),
        py::arg("equalize"),
        "lengths [N] -> (order [N], mb_offsets [M+1], rank_offsets [W+1], mb_tokens [M]), all int64.");
  m.def("metadata", &metadata_py, py::arg("lengths"),
        "lengths [n] of one micro-batch -> (cu_seqlens int32 [n+1], position_ids int64 [T], padded_index int64 [T]).");
}
