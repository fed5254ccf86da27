"""GAE on padded [B, T] rewards/values/mask, and the fused coherent reward + KL + GAE.

Providers: loop (the per-time-step loop peers use: ops.gae_ref), compile (torch.compile of that
loop), ours (the Triton reverse scan, one launch), ours_fused (coherent reward + KL shaping + GAE
from the four log-prob tensors, one launch; its baseline is reference_fused, the same computation
as separate PyTorch ops). Forward only (no gradients flow through advantages).

    python benchmarks/bench_gae.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import compiled, parse_args, pick, run_cases, triton_runs_here  # noqa: E402
from srppo_fast.ops import coherent_gae, coherent_gae_ref, gae, gae_ref  # noqa: E402

PROVIDERS = ["loop", "compile", "ours", "reference_fused", "ours_fused"]
MODES = ["fwd"]  # no gradients flow through advantages
FUSED = dict(kl_coef=0.2, kl_estimator="k1", granularity="sequence", token_clip=3.0, gamma=1.0, lam=0.95)


def setup_gae(case, provider: str, mode: str):
    shape, dtype, B, T = case
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    lengths = torch.randint(T // 4, T + 1, (B,), device=device, generator=g)
    mask = torch.arange(T, device=device)[None] < lengths[:, None]
    rewards, values = (torch.randn(B, T, device=device, generator=g) for _ in range(2))
    logps = [torch.randn(B, T, device=device, generator=g) - 2 for _ in range(4)]
    if provider in ("ours", "ours_fused") and not triton_runs_here():
        return None
    if provider == "loop":
        return lambda: gae_ref(rewards, values, mask, 1.0, 0.95)
    if provider == "compile":
        if device == "cuda" and T > 512:  # compiling the T-step loop did not finish in 200 s at T = 2048 (H100)
            return None
        fn = compiled(gae_ref)
        return (lambda: fn(rewards, values, mask, 1.0, 0.95)) if fn is not None else None
    if provider == "ours":
        return lambda: gae(rewards, values, mask, 1.0, 0.95, impl="triton")
    if provider == "reference_fused":
        return lambda: coherent_gae_ref(*logps, values, mask, **FUSED)
    if provider == "ours_fused":
        return lambda: coherent_gae(*logps, values, mask, impl="triton", **FUSED)
    return None


def cases(quick: bool) -> list[tuple]:
    if quick:
        sizes = [(8, 64)]
    elif not torch.cuda.is_available():
        sizes = [(64, 256)]
    else:
        sizes = [(512, 2048), (1024, 1024), (128, 8192)]
    return [(f"B={b} T={t}", torch.float32, b, t) for b, t in sizes]


def main(argv=None) -> list[dict]:
    args = parse_args(argv, __doc__.splitlines()[0])
    providers = pick(args.providers, PROVIDERS)
    if args.quick and not args.providers:
        providers = [p for p in providers if p != "compile"]  # compiling a 64-step loop takes minutes
    return run_cases("gae", cases(args.quick), providers, pick(args.modes, MODES, "mode"), setup_gae, quick=args.quick,
                     dry=args.dry)


if __name__ == "__main__":
    main()
