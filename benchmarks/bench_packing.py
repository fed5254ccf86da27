"""Packed-sequence batcher: C++ vs the Python reference, micro-batch metadata, pad fraction vs padding.

    python benchmarks/bench_packing.py               # N = 1k, 100k, 1M; appends to benchmarks/results/packing.csv
    python benchmarks/bench_packing.py --quick       # seconds (N = 1k, 10k): prints the rows, writes nothing
    python benchmarks/bench_packing.py --one cpp --n 100000 --dist chat   # one plan, for whole-process timing

Columns: wall times in ms (median of runs; the Python reference runs once at 1M), speedup = python / cpp,
pad_frac_padded = padding of batches of 64 sequences in data order, each padded to its longest,
pad_frac_packed = wasted micro-batch capacity of the plan (1 - tokens / (micro-batches * budget)).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from srppo_fast.packing import (  # noqa: E402
    microbatch_metadata,
    padded_to_longest_pad_fraction,
    plan_microbatches,
)

CSV_PATH = REPO / "benchmarks" / "results" / "packing.csv"
COLUMNS = [
    "timestamp", "git_sha", "cpu_model", "python_version", "numpy_version", "n_sequences", "distribution",
    "world_size", "token_budget", "cpp_ms", "python_ms", "speedup", "pad_frac_padded", "pad_frac_packed",
    "n_microbatches",
]
DISTRIBUTIONS = ("chat", "rl", "short")
PADDED_BATCH = 64  # sequences per batch of the padded-to-longest baseline


def setup_packing(n: int, dist: str, seed: int = 0) -> np.ndarray:
    """Token lengths [n] (int64) of a data mix:
    chat: SFT-like lognormal, median ~300, capped at 4096; rl: responses uniform 50..1024; short: 20..120."""
    rng = np.random.default_rng(seed)
    if dist == "chat":
        return np.clip(rng.lognormal(np.log(300), 1.0, n), 1, 4096).astype(np.int64)
    if dist == "rl":
        return rng.integers(50, 1025, n, dtype=np.int64)
    if dist == "short":
        return rng.integers(20, 121, n, dtype=np.int64)
    raise ValueError(f"unknown distribution {dist!r}: pick one of {DISTRIBUTIONS}")


def median_ms(fn, runs: int, warmup: int = 1) -> tuple[float, object]:
    """Median wall time of fn() in ms over `runs` calls after `warmup` calls; also fn's last result."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def bench_plan(n: int, dist: str, world_size: int, budget: int, quick: bool) -> dict:
    """One CSV row: C++ and reference times, and the pad fractions."""
    lengths = setup_packing(n, dist)
    args = dict(token_budget=budget, world_size=world_size, oversize="own_batch")
    cpp_ms, plan = median_ms(lambda: plan_microbatches(lengths, **args), runs=5 if n >= 10**6 else 15)
    py_runs = 1 if n >= 10**6 else (3 if n >= 10**5 or quick else 7)
    py_ms, ref = median_ms(lambda: plan_microbatches(lengths, **args, impl="python"), runs=py_runs,
                           warmup=0 if n >= 10**5 else 1)
    for field in ("order", "mb_offsets", "rank_offsets", "mb_tokens"):
        assert np.array_equal(getattr(plan, field), getattr(ref, field)), f"C++ and reference differ in {field}"
    return dict(
        n_sequences=n, distribution=dist, world_size=world_size, token_budget=budget,
        cpp_ms=f"{cpp_ms:.3f}", python_ms=f"{py_ms:.1f}", speedup=f"{py_ms / cpp_ms:.1f}",
        pad_frac_padded=f"{padded_to_longest_pad_fraction(lengths, PADDED_BATCH):.4f}",
        pad_frac_packed=f"{plan.pad_fraction():.4f}", n_microbatches=plan.num_microbatches(),
    )


def bench_metadata(n: int, dist: str, world_size: int, budget: int) -> str:
    """microbatch_metadata, C++ vs numpy reference: per call over every micro-batch of a plan, and one bulk
    call on 10k sequences (throughput without the per-call overhead)."""
    lengths = setup_packing(n, dist)
    plan = plan_microbatches(lengths, budget, world_size, oversize="own_batch")
    batches = [lengths[mb] for r in range(world_size) for mb in plan.microbatches(r)]
    bulk = lengths[:10_000]
    per_call, whole = [], []

    def each_batch(impl: str) -> None:  # results dropped at once, as a training step would
        for b in batches:
            microbatch_metadata(b, impl=impl)

    for impl in ("cpp", "python"):
        ms, _ = median_ms(functools.partial(each_batch, impl), runs=7, warmup=2)
        per_call.append(ms * 1e3 / len(batches))
        whole.append(median_ms(functools.partial(microbatch_metadata, bulk, impl=impl), runs=5)[0])
    seqs, tokens = np.mean([len(b) for b in batches]), plan.total_tokens / len(batches)
    return (f"metadata {dist:5s}: {len(batches)} micro-batches of ~{seqs:.0f} seqs / {tokens:.0f} tokens: "
            f"cpp {per_call[0]:.1f} us, python {per_call[1]:.1f} us per call ({per_call[1] / per_call[0]:.1f}x); "
            f"bulk {len(bulk)} seqs / {int(bulk.sum())} tokens: cpp {whole[0]:.2f} ms, python {whole[1]:.2f} ms "
            f"({whole[1] / whole[0]:.1f}x)")


def environment() -> dict:
    return dict(
        timestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        git_sha=git_sha(), cpu_model=cpu_model(), python_version=platform.python_version(),
        numpy_version=np.__version__,
    )


def git_sha() -> str:
    """HEAD's sha, '+dirty' when the packing sources differ from it; 'uncommitted' before the first commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short=12", "HEAD")
    if not sha:
        return "uncommitted"
    sources = ["csrc/packing.cpp", "srppo_fast/packing.py", "benchmarks/bench_packing.py"]
    return sha + ("+dirty" if git("status", "--porcelain", "--", *sources) else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_rows(rows: list[dict], path: Path | None) -> None:
    """Append to `path` (header when new), or print to stdout when path is None."""
    if path is None:
        writer = csv.DictWriter(sys.stdout, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        return
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def run_one(impl: str, n: int, dist: str, world_size: int, budget: int) -> None:
    """Build lengths and plan once: the unit that whole-process timing compares (same set-up both ways)."""
    plan = plan_microbatches(setup_packing(n, dist), budget, world_size, oversize="own_batch", impl=impl)
    print(impl, n, dist, plan.num_microbatches(), f"{plan.pad_fraction():.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 1k, 10k only; print rows, write nothing")
    parser.add_argument("--csv", type=Path, help=f"append rows here (default: {CSV_PATH}; --quick: stdout)")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--one", choices=["cpp", "python"], help="plan once with this impl and exit")
    parser.add_argument("--n", type=int, default=100_000, help="sequences for --one")
    parser.add_argument("--dist", choices=DISTRIBUTIONS, default="chat", help="length mix for --one")
    args = parser.parse_args(argv)
    if args.one:
        return run_one(args.one, args.n, args.dist, args.world_size, args.token_budget)

    sizes = (1_000, 10_000) if args.quick else (1_000, 100_000, 1_000_000)
    for dist in DISTRIBUTIONS:
        print(bench_metadata(sizes[-2], dist, args.world_size, args.token_budget), file=sys.stderr)
    env, rows = environment(), []
    for n in sizes:
        for dist in DISTRIBUTIONS:
            row = env | bench_plan(n, dist, args.world_size, args.token_budget, args.quick)
            rows.append(row)
            print(f"plan {dist:5s} n={n:>7d} W={args.world_size}: cpp {row['cpp_ms']} ms, python "
                  f"{row['python_ms']} ms ({row['speedup']}x); pad padded-to-longest {row['pad_frac_padded']}, "
                  f"packed {row['pad_frac_packed']} in {row['n_microbatches']} micro-batches", file=sys.stderr)
    write_rows(rows, args.csv if args.csv else (None if args.quick else CSV_PATH))


if __name__ == "__main__":
    main()
