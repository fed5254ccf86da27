"""lm_head matmul fused with token log-probs (the [N, V] logits never materialised), fwd / bwd / full.

Providers: torch (hidden @ W.T then the log-probs reference: materialises the logits), compile,
ours (chunked Triton op), liger (LigerFusedLinearCrossEntropyLoss, reduction none), cce (Cut
Cross-Entropy's linear_cross_entropy, reduction none). TFLOP/s counts 2 N H V per matmul: fwd 1,
bwd 2 (ours recomputes the logits: 3 matmuls; counted as 2, the useful work). Peak memory is what
the call adds on top of its inputs: the logits workspace is the point.

    python benchmarks/bench_linear_logprobs.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MODES, compiled, fresh_grads, parse_args, pick, run_cases, triton_runs_here  # noqa: E402
from srppo_fast.ops import linear_token_logprobs, linear_token_logprobs_ref  # noqa: E402

PROVIDERS = ["torch", "compile", "ours", "liger", "cce"]


def _peer(provider: str):
    if provider == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None
        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda h, w, y: -loss(w, h, y)
    if provider == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            return None
        return lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none")
    return None


def setup_linear_logprobs(case, provider: str, mode: str):
    shape, dtype, N, H, V = case
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if provider == "ours":
        if not triton_runs_here():
            return None
        fn = lambda h, w, y: linear_token_logprobs(h, w, y, impl="triton")  # noqa: E731
    elif provider == "torch":
        fn = linear_token_logprobs_ref
    elif provider == "compile":
        fn = compiled(linear_token_logprobs_ref)
    else:
        fn = _peer(provider) if device == "cuda" else None
    if fn is None:
        return None
    hidden = torch.randn(N, H, device=device, dtype=dtype)
    weight = torch.randn(V, H, device=device, dtype=dtype) * H**-0.5
    labels = torch.randint(0, V, (N,), device=device)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(hidden, weight, labels)
        return run
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    grad = torch.randn(N, device=device)
    if mode == "full":
        return fresh_grads([h, w], lambda: fn(h, w, labels).backward(grad))
    out = fn(h, w, labels)
    return fresh_grads([h, w], lambda: out.backward(grad, retain_graph=True))


def flops(case, mode: str, provider: str) -> float:
    _, _, N, H, V = case
    return 2.0 * N * H * V * {"fwd": 1, "bwd": 2, "full": 3}[mode]


def cases(quick: bool) -> list[tuple]:
    if not torch.cuda.is_available() or quick:
        sizes, dtype = ([(64, 32, 1000)] if quick else [(512, 256, 32000)]), torch.float32
    else:
        sizes, dtype = [(4096, 4096, 128256), (16384, 4096, 128256), (16384, 3584, 151936),
                        (16384, 4096, 32000)], torch.bfloat16
    return [(f"N={n} H={h} V={v}", dtype, n, h, v) for n, h, v in sizes]


def main(argv=None) -> list[dict]:
    args = parse_args(argv, __doc__.splitlines()[0])
    return run_cases("linear_token_logprobs", cases(args.quick), pick(args.providers, PROVIDERS),
                     pick(args.modes, MODES, "mode"), setup_linear_logprobs, flops_fn=flops,
                     quick=args.quick, dry=args.dry)


if __name__ == "__main__":
    main()
