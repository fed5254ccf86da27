"""Triton plumbing shared by the ops: the optional import, the `impl` switch, launch helpers, the mask rule.

`impl="auto"` takes the Triton kernel for CUDA tensors and the PyTorch reference elsewhere; the
environment variable SRPPO_FAST_IMPL (torch | triton) overrides "auto". A fallback from Triton to
the reference is logged once per op, never silent. Triton kernels run on CPU tensors only under
TRITON_INTERPRET=1 (set before triton is imported): that is how the tests run them on CPU.

The mask rule of every op: a mask is boolean. A float or integer mask means `mask != 0` (a 0.5 or a 2.0
selects the token, it never weights it), in the references and the kernels alike; each dispatching
function converts once (`bool_mask`) before taking either path. The launchers hand the kernels
contiguous inputs (`mask_bytes`, `.contiguous()`, `contiguous_rows`): a kernel indexes every tensor
with one set of offsets.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("srppo_fast")
IMPL_ENV = "SRPPO_FAST_IMPL"
IMPLS = ("auto", "torch", "triton")

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the kernels below are defined but never launched
    HAVE_TRITON = False

    class _Missing:
        """Stands in for `triton` / `triton.language` so kernel definitions still parse."""

        constexpr = int
        float32 = int64 = int32 = None

        def jit(self, fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            raise RuntimeError("triton is not installed: pip install triton (GPU machines), or use impl='torch'")

    triton = tl = _Missing()

_noted: set[tuple[str, str]] = set()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _note_once(op: str, message: str) -> None:
    """Log which implementation an op takes, once per (op, implementation) in a process."""
    if (op, message) not in _noted:
        _noted.add((op, message))
        log.info("%s: %s", op, message)


def resolve_impl(impl: str, op: str, *tensors: torch.Tensor) -> str:
    """'torch' or 'triton' for this call (see the module doc)."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        forced = os.environ.get(IMPL_ENV, "auto")
        if forced not in IMPLS:
            raise ValueError(f"{IMPL_ENV}={forced!r}: use torch, triton or auto")
        impl = forced
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if impl == "auto":
        if on_cuda and HAVE_TRITON:
            return "triton"
        _note_once(op, "PyTorch reference (" + ("triton is not installed" if on_cuda else "CPU tensors") + ")")
        return "torch"
    if impl == "triton":
        if not HAVE_TRITON:
            raise RuntimeError(f"{op}: impl='triton' needs the triton package (pip install triton)")
        if not on_cuda and not interpreting():
            raise RuntimeError(f"{op}: impl='triton' on CPU tensors runs only under TRITON_INTERPRET=1, set before "
                               "triton is imported; use impl='torch' on CPU otherwise")
        _note_once(op, "Triton kernel" + ("" if on_cuda else " (interpreted on the CPU)"))
    return impl


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def vocab_block(V: int, cap: int = 8192) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a loop over a row of V columns."""
    block = min(next_power_of_2(V), cap)
    return max(block, 16), (16 if block >= 8192 else 8 if block >= 2048 else 4)


def contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose rows are contiguous and do not overlap (a copy only when they are not): the
    kernels take a row stride, so a slice of a wider row (stride > columns) is read in place."""
    if x.stride(-1) == 1 and (x.shape[0] <= 1 or x.stride(0) >= x.shape[-1]):
        return x
    return x.contiguous()


def bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask rule (see the module doc): `mask != 0` as a bool tensor; bool masks and None pass through."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask != 0


def mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as the contiguous uint8 tensor the kernels load (a copy only when it is strided)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask_bytes takes a bool mask (bool_mask() first), got {mask.dtype}")
    return mask.contiguous().view(torch.uint8)
