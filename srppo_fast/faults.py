"""Fault-injection points. The code marks the places where a test may make something fail (a filesystem step of a
save, a sampler call, a weight-sync bucket) with `point(name, ...)`; nothing happens unless a test installed a hook
for that name (tests/faulty.py: a run with faults, as a process). A hook gets the point's arguments and returns what
the point documents (None: carry on as usual)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_HOOKS: dict[str, Callable[..., Any]] = {}
POINTS = {
    "fs_step": "(n, label): before the n-th filesystem step of this process's saves (io.fs_step); may kill",
    "sampler_generate": "(call, run): the vLLM sampler's call-th generate; returns a replacement for `run`",
    "sync_bucket": "(rank, bucket, syncs, load): a weight-sync bucket; returns 'skip' (not sent) or a replacement "
                   "for `load`",
    "step_logged": "(stage, step): a training step's metrics row is written (stages/loop.py); may signal",
}


def install(name: str, hook: Callable[..., Any]) -> None:
    """Call `hook` at every `point(name, ...)` of this process."""
    if name not in POINTS:
        raise KeyError(f"unknown fault point {name!r}; the points are {', '.join(POINTS)}")
    _HOOKS[name] = hook


def clear() -> None:
    _HOOKS.clear()


def point(name: str, **where: Any) -> Any:
    """A place where a test may inject a fault: the installed hook's answer, or None."""
    hook = _HOOKS.get(name)
    return hook(**where) if hook is not None else None
