"""The PPO losses (clipped surrogate + entropy + KL in the loss + clipped value loss) with their stats,
fwd / bwd / full on N response tokens.

Providers: torch (ops.ppo_loss_ref: about a dozen elementwise launches each way), compile, ours (one
Triton launch forward, one backward). Bytes: fwd reads 9 fp32 inputs and the mask; bwd reads them
and writes 3 gradients.

    python benchmarks/bench_ppo_loss.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MODES, compiled, fresh_grads, parse_args, pick, run_cases, triton_runs_here  # noqa: E402
from srppo_fast.ops import ppo_loss, ppo_loss_ref  # noqa: E402

PROVIDERS = ["torch", "compile", "ours"]


def _loss(fn):
    def total(logp, ent, values, d):
        actor, critic, stats = fn(logp, d["old"], d["adv"], d["mask"], entropy=ent, entropy_coef=0.01,
                                  ref_logp=d["ref"], kl_coef=0.05, kl_estimator="k3", values=values,
                                  old_values=d["old_values"], returns=d["returns"], value_clip=0.2)
        return actor + critic
    return total


def setup_ppo_loss(case, provider: str, mode: str):
    shape, dtype, N = case
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if provider == "ours":
        if not triton_runs_here():
            return None
        fn = _loss(lambda *a, **k: ppo_loss(*a, impl="triton", **k))
    elif provider == "torch":
        fn = _loss(ppo_loss_ref)
    else:
        fn = compiled(_loss(ppo_loss_ref))
        if fn is None:
            return None
    d = {k: torch.randn(N, device=device) for k in ("old", "adv", "ref", "old_values", "returns")}
    d["mask"] = torch.rand(N, device=device) > 0.1
    logp, ent, values = (torch.randn(N, device=device).requires_grad_() for _ in range(3))
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(logp, ent, values, d)
        return run
    if mode == "full":
        return fresh_grads([logp, ent, values], lambda: fn(logp, ent, values, d).backward())
    out = fn(logp, ent, values, d)
    return fresh_grads([logp, ent, values], lambda: out.backward(retain_graph=True))


def bytes_moved(case, mode: str) -> int:
    N = case[2]
    return {"fwd": 10 * 4 * N, "bwd": 13 * 4 * N, "full": 23 * 4 * N}[mode]


def cases(quick: bool) -> list[tuple]:
    sizes = [4096] if quick else ([65536] if not torch.cuda.is_available() else [16384, 262144, 1048576])
    return [(f"N={n}", torch.float32, n) for n in sizes]


def main(argv=None) -> list[dict]:
    args = parse_args(argv, __doc__.splitlines()[0])
    return run_cases("ppo_loss", cases(args.quick), pick(args.providers, PROVIDERS),
                     pick(args.modes, MODES, "mode"), setup_ppo_loss, bytes_fn=bytes_moved,
                     quick=args.quick, dry=args.dry)


if __name__ == "__main__":
    main()
