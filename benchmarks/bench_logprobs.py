"""Token log-probs from logits (log-softmax + gather), fwd / bwd / full.

Providers: torch (eager reference), compile (torch.compile of it), ours (the Triton kernel), liger
(LigerCrossEntropyLoss, reduction none), flash_attn (flash-attn's Triton cross_entropy_loss); each
only where installed and runnable. Bytes: fwd reads the logits, bwd reads them and writes the
gradient. Shapes from real vocabularies (Llama-2 32000, Llama-3 128256, Qwen-2 151936).

    python benchmarks/bench_logprobs.py [--quick] [--providers ours,torch] [--modes fwd,full]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MODES, compiled, fresh_grads, parse_args, pick, run_cases, triton_runs_here  # noqa: E402
from srppo_fast.ops import token_logprobs, token_logprobs_ref  # noqa: E402

PROVIDERS = ["torch", "compile", "ours", "liger", "flash_attn"]


def _peer(provider: str):
    """A function (logits, labels) -> log-probs [N] for an installed peer, else None."""
    if provider == "liger":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError:
            return None
        loss = LigerCrossEntropyLoss(reduction="none")
        return lambda x, y: -loss(x, y)
    if provider == "flash_attn":
        try:
            from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
        except ImportError:
            return None
        return lambda x, y: -cross_entropy_loss(x, y)[0]
    return None


def setup_logprobs(case, provider: str, mode: str):
    shape, dtype, N, V = case
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if provider == "ours":
        if not triton_runs_here():
            return None
        fn = lambda x, y: token_logprobs(x, y, impl="triton")  # noqa: E731
    elif provider == "torch":
        fn = token_logprobs_ref
    elif provider == "compile":
        fn = compiled(token_logprobs_ref)
    else:
        fn = _peer(provider)
    if fn is None or (provider in ("liger", "flash_attn") and device == "cpu"):
        return None
    logits = torch.randn(N, V, device=device, dtype=dtype)
    labels = torch.randint(0, V, (N,), device=device)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(logits, labels)
        return run
    x = logits.clone().requires_grad_()
    grad = torch.randn(N, device=device)
    if mode == "full":
        return fresh_grads([x], lambda: fn(x, labels).backward(grad))
    out = fn(x, labels)
    return fresh_grads([x], lambda: out.backward(grad, retain_graph=True))


def bytes_moved(case, mode: str) -> int:
    _, dtype, N, V = case
    size = N * V * torch.finfo(dtype).bits // 8
    return {"fwd": size, "bwd": 2 * size, "full": 3 * size}[mode]


def cases(quick: bool) -> list[tuple]:
    if not torch.cuda.is_available() or quick:
        sizes = [(64, 1000), (64, 3000)] if quick else [(256, 32000), (512, 32000)]
        dtype = torch.float32
    else:
        sizes = [(4096, 32000), (16384, 32000), (4096, 128256), (16384, 128256), (16384, 151936)]
        dtype = torch.bfloat16
    return [(f"N={n} V={v}", dtype, n, v) for n, v in sizes]


def main(argv=None) -> list[dict]:
    args = parse_args(argv, __doc__.splitlines()[0])
    return run_cases("token_logprobs", cases(args.quick), pick(args.providers, PROVIDERS),
                     pick(args.modes, MODES, "mode"), setup_logprobs, bytes_fn=bytes_moved,
                     quick=args.quick, dry=args.dry)


if __name__ == "__main__":
    main()
