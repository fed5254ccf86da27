"""Shared benchmark harness: timing (triton.testing.do_bench on CUDA; a wall-clock loop on CPU), peak
memory, the machine's measured copy bandwidth, and CSV rows with device, versions and git SHA.

Every script defines `setup_<op>(shape, dtype, provider, mode)` returning a callable (or None when the
provider is not installed / cannot run here), and `main(argv)`; `srppo-fast bench` calls the mains.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
COLUMNS = ["timestamp", "git_sha", "device", "torch", "triton", "op", "provider", "mode", "shape", "dtype",
           "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "gb_per_s", "pct_copy_bw", "tflops", "note"]


def cpu_model() -> str:
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    interp = " (Triton interpreted)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads{interp}"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def git_sha() -> str:
    if os.environ.get("SRPPO_FAST_GIT_SHA"):  # a copy of the tree without .git (a remote GPU machine)
        return os.environ["SRPPO_FAST_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fresh_grads(leaves, step: Callable[[], object]) -> Callable[[], object]:
    """A timed backward that starts from no .grad: autograd would otherwise add each call's gradient into the
    last one (an extra read and write of the whole gradient per call, charged to the provider)."""
    def run():
        for leaf in leaves:
            leaf.grad = None
        return step()
    return run


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) in ms."""
    if torch.cuda.is_available():
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=10 if quick else 25,
                                             rep=20 if quick else 100))
    fn()  # warm-up (compilation, allocation)
    times = []
    budget = 0.3 if quick else 2.0
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


def peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Peak device memory above what was allocated before one call (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_copy_bw: float | None = None


def copy_bandwidth_gbs() -> float | None:
    """The device's measured copy bandwidth (read + write of a 1 GiB buffer), GB/s; None on CPU."""
    global _copy_bw
    if _copy_bw is None and torch.cuda.is_available():
        src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        ms = measure(lambda: dst.copy_(src))[0]
        _copy_bw = 2 * src.numel() / (ms * 1e-3) / 1e9
    return _copy_bw


def row(op: str, provider: str, mode: str, shape: str, dtype: torch.dtype, timing, peak, *, bytes_moved=None,
        flops=None, note: str = "") -> dict:
    median, p20, p80 = timing
    gbs = bytes_moved / (median * 1e-3) / 1e9 if bytes_moved else None
    bw = copy_bandwidth_gbs()
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(), "device": device_name(), "torch": torch.__version__, "triton": version("triton"),
        "op": op, "provider": provider, "mode": mode, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
        "median_ms": f"{median:.4f}", "p20_ms": f"{p20:.4f}", "p80_ms": f"{p80:.4f}",
        "peak_mem_mb": f"{peak:.1f}" if peak is not None else "",
        "gb_per_s": f"{gbs:.1f}" if gbs else "", "pct_copy_bw": f"{100 * gbs / bw:.1f}" if gbs and bw else "",
        "tflops": f"{flops / (median * 1e-3) / 1e12:.2f}" if flops else "", "note": note,
    }


def write_rows(rows: list[dict], name: str, dry: bool) -> None:
    """Append to benchmarks/results/<name>.csv (header on creation); with dry, print only."""
    for r in rows:
        print(f"{r['op']:<22} {r['provider']:<14} {r['mode']:<5} {r['shape']:<28} {r['dtype']:<9} "
              f"{r['median_ms']:>10} ms  [{r['p20_ms']}, {r['p80_ms']}]  mem {r['peak_mem_mb'] or '-':>8} MB  "
              f"{(r['gb_per_s'] + ' GB/s') if r['gb_per_s'] else ''} "
              f"{(r['tflops'] + ' TFLOP/s') if r['tflops'] else ''}"
              f" {r['note']}")
    if dry or not rows:
        return
    append_rows(RESULTS / f"{name}.csv", rows, COLUMNS)


def append_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Append rows to a results CSV, writing the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def compiled(fn: Callable) -> Callable | None:
    """torch.compile(fn), or None where inductor cannot compile here."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # noqa: BLE001
        return None


def triton_runs_here() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def run_cases(op: str, cases: list[tuple], providers: list[str], modes: list[str], setup, *, bytes_fn=None,
              flops_fn=None, quick: bool = False, dry: bool = False, csv_name: str | None = None) -> list[dict]:
    """Time setup(case, provider, mode) for every combination; rows are printed and appended to the CSV."""
    rows = []
    for case in cases:
        for mode in modes:
            for provider in providers:
                try:
                    fn = setup(case, provider, mode)
                except Exception as e:  # noqa: BLE001 - a provider that breaks is reported, not fatal
                    print(f"{op} {provider} {mode} {case}: skipped ({type(e).__name__}: {str(e).splitlines()[0]})")
                    continue
                if fn is None:
                    continue
                timing = measure(fn, quick)
                peak = peak_memory_mb(fn)
                shape, dtype = case[0], case[1]
                rows.append(row(op, provider, mode, shape, dtype, timing, peak,
                                bytes_moved=bytes_fn(case, mode) if bytes_fn else None,
                                flops=flops_fn(case, mode, provider) if flops_fn else None))
                fn = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    write_rows(rows, csv_name or op, dry)
    return rows


def parse_args(argv, description: str):
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (CI-safe); prints only")
    p.add_argument("--providers", default="", help="comma-separated subset of providers")
    p.add_argument("--modes", default="", help="comma-separated subset of fwd,bwd,full")
    p.add_argument("--dry", action="store_true", help="print the rows, do not append to the CSV")
    args = p.parse_args(argv)
    args.dry = args.dry or args.quick
    return args


MODES = ["fwd", "bwd", "full"]


def names(requested: str) -> list[str]:
    """'a,b,' -> ['a', 'b']."""
    return [n.strip() for n in requested.split(",") if n.strip()]


def pick(requested: str, available: list[str], what: str = "provider") -> list[str]:
    """The comma-separated subset `requested` of `available` (all of it when empty); an unknown name ends the
    script with one line listing the known ones (`srppo-fast bench` checks the same before running anything)."""
    if not requested:
        return list(available)
    chosen = names(requested)
    unknown = [n for n in chosen if n not in available]
    if unknown or not chosen:
        raise SystemExit(f"error: unknown {what} {', '.join(unknown) or repr(requested)}; known: "
                         f"{', '.join(available)}")
    return chosen
