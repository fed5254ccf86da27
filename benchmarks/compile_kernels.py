"""Compile the Triton kernel variants the trainer launches, ahead of time and without a GPU, for the H100/H200
(sm_90a) and the A100 (sm_80), and report what ptxas says of each: registers per thread, spill stores/loads,
stack frame, and the shared memory Triton allocates.

This catches what the interpreter cannot (compiled-mode type rules, unsupported ops) and checks the promise
that a 128k-256k vocabulary never spills registers. It is a static resource report, not a speed measurement.
Must run without TRITON_INTERPRET (the script refuses otherwise).

How the variants are found. `call_sites()` calls the ops the way the trainer does (same keyword arguments,
dtypes and layouts; CPU tensors of representative sizes) with every kernel launch intercepted: the arguments a
launcher hands `kernel[grid](...)` go through Triton's own launch binder for the target, so signature,
constexprs, num_warps and specialisation hints are the ones a real launch gets. Triton gives a pointer the
16-byte alignment hint (tt.divisibility 16) when its address is a multiple of 16, an integer that hint when it
is a multiple of 16, and types an integer i32 below 2**31. Launches that specialise identically are one
variant. Assumed of real launches, so reproduced here:

* every pointer is 16-byte aligned: the trainer hands the kernels fresh allocations (logits chunks, boolean-
  indexed log-probs, [B, T] buffers); the only views are linear_token_logprobs' label/lse/gradient chunks,
  which start at multiples of 64 rows;
* vocabulary: V = 128256 (Llama 3; Mistral's 32768 and Qwen2's 151936 also take BLOCK_V = 8192 and are also
  multiples of 16) and the embedded world's V = 273 (BLOCK_V = 512, V and the row stride not multiples of 16);
* logits in bf16 (precision bf16, the default on GPUs that have it) and fp32 (precision fp32); fp16 is never
  used by the trainer and not compiled;
* data-dependent sizes get both specialisations: the micro-batch's response-token count N of the PPO
  kernels (1000 and 1024), and the buffer's longest response T of the GAE kernels (50 and 64: BLOCK_T 64,
  max_new_tokens' default; 1000 and 1024: BLOCK_T 1024, the cap, for max_new_tokens > 512);
* the PPO kernels without the KL term are compiled with KL_CODE = 1 only (the constexpr is dead code then).

`coherent_gae` and `gae` are called by the trainer on the experience buffer, which lives on the CPU: "auto"
takes their PyTorch references there, so today these kernels run only when the ops get CUDA tensors. They are
compiled for the launches those call sites would make on CUDA tensors; the packed GAE (`cu_seqlens`), which
only the public API reaches, is compiled too (call site marked "API only").

    python benchmarks/compile_kernels.py [--arch 90 --arch 80] [--jobs N] [--csv]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import os
import re
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CSV_PATH = REPO / "benchmarks" / "results" / "kernel_compile.csv"
ARCHS = (90, 80)  # H100/H200 (compiled as sm_90a), A100
COLUMNS = ["timestamp", "git_sha", "ops_sha256", "device", "torch", "triton", "ptxas", "kernel", "variant", "arch",
           "num_warps", "num_stages", "registers", "spill_stores", "spill_loads", "stack_frame", "shared_bytes", "ok",
           "signature", "call_sites"]
KERNELS = {  # short name -> (module, kernel)
    "logprobs_fwd": ("srppo_fast.ops.logprobs", "_token_logprobs_fwd_kernel"),
    "logprobs_bwd": ("srppo_fast.ops.logprobs", "_token_logprobs_bwd_kernel"),
    "gae": ("srppo_fast.ops.gae", "_gae_kernel"),
    "coherent_gae": ("srppo_fast.ops.gae", "_coherent_gae_kernel"),
    "ppo_fwd": ("srppo_fast.ops.ppo", "_ppo_fwd_kernel"),
    "ppo_bwd": ("srppo_fast.ops.ppo", "_ppo_bwd_kernel"),
}
REAL_V, WORLD_V = 128256, 273
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # launches get the same default


# ------------------------------------------------------------------------------------------------
# 1. the trainer's call sites, with the launches intercepted


def call_sites():
    """(call site, thunk) pairs: each thunk calls an op as the trainer does (see the module doc)."""
    import torch

    from srppo_fast.ops import coherent_gae, gae, linear_token_logprobs, ppo_loss, value_loss
    from srppo_fast.ops.gae import returns_to_go

    def logprobs(dtype, V):
        def run():
            # experience.packed_label_logprobs: hidden states of the label positions through the fused lm_head
            hidden = torch.randn(8, 16, dtype=dtype, requires_grad=True)  # [N, H]; bf16 under autocast
            weight = torch.randn(V, 16, requires_grad=True)  # [V, H] fp32 master weights, cast like autocast
            labels = torch.randint(V, (8,))
            labels[0] = -100
            with torch.no_grad():  # scoring: old/ref/pi_SFT/pi_PT log-probs
                linear_token_logprobs(hidden, weight, labels, 0.7)
            linear_token_logprobs(hidden, weight, labels).sum().backward()  # pretrain / SFT
            logp, ent = linear_token_logprobs(hidden, weight, labels, 0.7, return_entropy=True)  # PPO actor
            (logp.sum() + ent.sum()).backward()
        return run

    def ppo(N, kl, critic, dual_clip=None):
        def run():  # stages/rl.py minibatch_losses
            logp, ent = torch.randn(N, requires_grad=True), torch.rand(N, requires_grad=True)
            ones = torch.ones(N, dtype=torch.bool)
            value_kw = dict(values=torch.randn(N, requires_grad=True), old_values=torch.randn(N),
                            returns=torch.randn(N), value_clip=0.2) if critic else {}
            actor, critic_loss, _ = ppo_loss(logp, torch.randn(N), torch.randn(N), ones, clip_eps=0.2,
                                             clip_eps_high=0.28, entropy=ent, entropy_coef=0.01,
                                             ref_logp=torch.randn(N) if kl else None, kl_coef=0.05 if kl else 0.0,
                                             kl_estimator=kl or "k1", normalizer=N, dual_clip=dual_clip,
                                             **value_kw)
            torch.autograd.backward([x for x in (actor, critic_loss) if x is not None])
        return run

    def critic_warmup(N):
        def run():  # stages/rl.py minibatch_losses, critic-only warm-up
            loss, _ = value_loss(torch.randn(N, requires_grad=True), mask=torch.ones(N, dtype=torch.bool),
                                 normalizer=N, old_values=torch.randn(N), returns=torch.randn(N), value_clip=0.2)
            loss.backward()
        return run

    def buffer(T, B=6):
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T  # T is the longest response of the buffer
        return lambda: torch.randn(B, T), torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)

    def coherent(T, values, granularity, length_normalize, kl):
        def run():  # stages/rl.py rewards_and_advantages
            x, mask = buffer(T)
            B = mask.shape[0]
            coherent_gae(x(), x(), x(), x(), x() if values else None, mask, kl_coef=0.05, kl_estimator=kl,
                         granularity=granularity, scale=1.0, token_clip=None, length_normalize=length_normalize,
                         seq_scale=torch.ones(B), seq_shift=torch.zeros(B), seq_clip=None, gamma=1.0, lam=0.95)
        return run

    def advantages(T):
        def run():  # advantages.compute_advantages (reward-model path): gae, or returns_to_go
            x, mask = buffer(T)
            gae(x(), x(), mask, 1.0, 0.95)
            returns_to_go(x(), mask, 1.0)
        return run

    def packed_gae(with_mask):
        def run():
            cu = torch.tensor([0, 17, 40, 64], dtype=torch.int32)
            gae(torch.randn(64), torch.randn(64), torch.ones(64, dtype=torch.bool) if with_mask else None,
                cu_seqlens=cu)
        return run

    sites = []
    for dtype in (torch.bfloat16, torch.float32):
        for V in (REAL_V, WORLD_V):
            sites.append((f"linear_token_logprobs {str(dtype)[6:]} V={V}", logprobs(dtype, V)))
    for N in (1000, 1024):
        for critic in (False, True):
            for kl in (None, "k2", "k3"):
                sites.append((f"ppo_loss N={N} kl={kl or 'off'} critic={critic}", ppo(N, kl, critic)))
            sites.append((f"ppo_loss N={N} dual_clip=3 critic={critic}", ppo(N, None, critic, 3.0)))
        sites.append((f"value_loss N={N}", critic_warmup(N)))
    for T in (50, 64, 1000, 1024):
        for values in (False, True):
            for granularity in ("sequence", "token"):
                for length_normalize in (False, True):
                    for kl in ("k1", "k2", "k3"):
                        sites.append((f"coherent_gae T={T} values={values} {granularity} "
                                      f"length_normalize={length_normalize} {kl}",
                                      coherent(T, values, granularity, length_normalize, kl)))
        sites.append((f"gae/returns_to_go T={T}", advantages(T)))
    for with_mask in (False, True):
        sites.append((f"gae packed mask={with_mask} (API only)", packed_gae(with_mask)))
    return sites


@contextlib.contextmanager
def intercepted_launches(log: list):
    """Every kernel in KERNELS appends (short name, args, kwargs) to `log` instead of launching; every op takes
    its Triton path (resolve_impl answers "triton") on the CPU tensors of call_sites()."""
    import importlib

    patched = []
    for short, (module, name) in KERNELS.items():
        kernel = getattr(importlib.import_module(module), name)
        kernel.run = (lambda s: lambda *args, grid, warmup, **kwargs: log.append((s, args, kwargs)))(short)
        patched.append(kernel)
    modules = [importlib.import_module(f"srppo_fast.ops.{m}") for m in ("logprobs", "linear_logprobs", "gae", "ppo")]
    saved = [(m, m.resolve_impl) for m in modules if hasattr(m, "resolve_impl")]
    for m, _ in saved:
        m.resolve_impl = lambda impl, op, *tensors: "triton"
    try:
        yield
    finally:
        for kernel in patched:
            del kernel.run
        for m, fn in saved:
            m.resolve_impl = fn


def specialise(short: str, args: tuple, kwargs: dict, arch: int) -> dict:
    """What Triton's launch binder makes of these launch arguments for sm_`arch`: a picklable compile job."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    module, name = KERNELS[short]
    kernel = getattr(__import__(module, fromlist=[name]), name)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = {**kwargs, "debug": kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
              "instrumentation_mode": knobs.compilation.instrumentation_mode,
              "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts}  # as JITFunction.run adds them
    bound, specialization, options = create_function_from_signature(kernel.signature, kernel.params, backend)(
        *args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    names = list(signature)
    hinted = {names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr}
    sig_text = " ".join(f"{k}:{v}" + ("/16" if k in hinted else "") for k, v in signature.items() if v != "constexpr")
    meta = " ".join(f"{names[path[0]]}={value}" for path, value in sorted(constexprs.items()))
    first_ptr = next(v for v in signature.values() if v.startswith("*"))[1:]
    ints = [k for k, v in signature.items() if v in ("i32", "i64")]
    variant = f"{meta} {first_ptr} " + ("ints/16=" + ",".join(k for k in ints if k in hinted) if hinted & set(ints)
                                        else "ints/16=none")
    return {"kernel": short, "arch": arch, "signature": signature, "constexprs": constexprs, "attrs": attrs,
            "options": options.__dict__, "variant": variant, "sig_text": sig_text,
            "num_warps": options.num_warps, "num_stages": options.num_stages}


def jobs_for(archs) -> list[dict]:
    """One compile job per distinct specialisation per arch, with the call sites that launch it."""
    log: list = []
    by_key: dict = {}
    with intercepted_launches(log):
        for site, run in call_sites():
            start = len(log)
            run()
            if len(log) == start:
                raise RuntimeError(f"call site '{site}' launched no kernel: the op no longer takes its Triton path")
            for short, args, kwargs in log[start:]:
                for arch in archs:
                    job = specialise(short, args, kwargs, arch)
                    key = (short, arch, repr(sorted(job["signature"].items())), repr(sorted(job["constexprs"].items())),
                           repr(sorted(job["attrs"].items())), repr(sorted(job["options"].items())))
                    by_key.setdefault(key, {**job, "call_sites": []})
                    if site not in by_key[key]["call_sites"]:
                        by_key[key]["call_sites"].append(site)
    return list(by_key.values())


# ------------------------------------------------------------------------------------------------
# 2. compile: Triton's own ptxas run, its -v log parsed


def _init_worker():
    from triton import knobs

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v output of the cubin it builds


def compile_job(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _init_worker()
    module, name = KERNELS[job["kernel"]]
    kernel = getattr(__import__(module, fromlist=[name]), name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        compiled = triton.compile(ASTSource(fn=kernel, signature=job["signature"], constexprs=job["constexprs"],
                                            attrs=job["attrs"]),
                                  target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    text = out.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_stores": int(spills.group(1)) if spills else -1,
            "spill_loads": int(spills.group(2)) if spills else -1,
            "stack_frame": int(stack.group(1)) if stack else -1,
            "shared_bytes": compiled.metadata.shared, "ok": bool(regs and spills and stack)}


# ------------------------------------------------------------------------------------------------
# 3. rows: the machine, versions and git SHA as benchmarks/common.py writes them


def ops_sha256() -> str:
    """Content hash of srppo_fast/ops/*.py as compiled (they may differ from the commit in git_sha)."""
    h = hashlib.sha256()
    for path in sorted((REPO / "srppo_fast" / "ops").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def ptxas_version(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas_version

    found = re.search(r"V(\d+\.\d+\.\d+)", get_ptxas_version(arch))
    return found.group(1) if found else "unknown"


def arch_name(arch: int) -> str:
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def compile_all(archs=ARCHS, jobs: int | None = None) -> list[dict]:
    """A row per (variant, arch), each naming the machine, versions and git SHA (COLUMNS)."""
    import torch

    from benchmarks.common import device_name, git_sha, version

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_kernels compiles real kernels: unset TRITON_INTERPRET before importing triton")
    work = jobs_for(archs)
    workers = jobs or min(len(work), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
            reports = list(pool.map(compile_job, work, chunksize=4))
    else:
        reports = [compile_job(job) for job in work]
    common = {"timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "git_sha": git_sha(), "ops_sha256": ops_sha256(), "device": device_name(), "torch": torch.__version__,
              "triton": version("triton")}
    ptxas = {arch: ptxas_version(arch) for arch in archs}
    rows = [{**common, "ptxas": ptxas[job["arch"]], "kernel": job["kernel"], "variant": job["variant"],
             "arch": arch_name(job["arch"]), "num_warps": job["num_warps"], "num_stages": job["num_stages"],
             **report, "signature": job["sig_text"], "call_sites": "; ".join(job["call_sites"])}
            for job, report in zip(work, reports)]
    return sorted(rows, key=lambda r: (r["arch"] != "sm_90a", r["arch"], list(KERNELS).index(r["kernel"]),
                                       r["variant"]))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability x 10; repeat (default: 90 and 80)")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    p.add_argument("--csv", action="store_true", help="replace benchmarks/results/kernel_compile.csv")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_kernels.py compiles real kernels: unset TRITON_INTERPRET")
    rows = compile_all(tuple(args.arch or ARCHS), args.jobs)
    for r in rows:
        print(f"{r['arch']:<7} {r['kernel']:<13} {r['variant']:<95} warps={r['num_warps']:<3} regs={r['registers']:<4}"
              f" spill={r['spill_stores']}/{r['spill_loads']} stack={r['stack_frame']} smem={r['shared_bytes']}")
    for arch in sorted({r["arch"] for r in rows}):
        mine = [r for r in rows if r["arch"] == arch]
        print(f"{arch}: {len(mine)} variants, max {max(r['registers'] for r in mine)} registers, "
              f"{sum(r['spill_stores'] + r['spill_loads'] for r in mine)} bytes spilled, "
              f"{sum(not r['ok'] for r in mine)} failed")
    if args.csv:
        import csv

        with open(CSV_PATH, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
