"""The data-parallel process group: who we are, and the few collectives the stages need.

One process (no launcher) is world size 1 and needs no process group unless DeepSpeed asks for one.
Under `torchrun` or `deepspeed` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment) every
process joins one group: NCCL on CUDA, gloo on the CPU. Rank 0 alone writes the run's files (config,
world, metrics, checkpoints' Hugging Face directories); every rank computes.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as tdist

from .errors import ConfigError

_comm_seconds = 0.0  # wall time spent in the collectives below (the stages' own; not DeepSpeed's)


def comm_seconds() -> float:
    """Seconds spent so far in this module's collectives (waiting for slower ranks included)."""
    return _comm_seconds


def _timed(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _comm_seconds
        if world_size() == 1:
            return fn(*args, **kwargs)
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _comm_seconds += time.perf_counter() - t

    return wrapper


OWN_GROUP = "SRPPO_FAST_OWN_GROUP"  # the MASTER_PORT of a group of one that `init` made (not a launcher's)


def launched() -> bool:
    """Started by torchrun / deepspeed (or any launcher that sets WORLD_SIZE and RANK). The variables `init` sets
    for a group of one of its own do not count: a child process that inherits them was not launched."""
    own = os.environ.get(OWN_GROUP)
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and (own is None or own != os.environ.get("MASTER_PORT"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def env_rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


def initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device: torch.device, timeout_minutes: int = 30) -> None:
    """Join the process group (idempotent). Without a launcher, a group of one on a free loopback port
    (DeepSpeed wants one even for a single process)."""
    if initialized():
        return
    if not launched():  # DeepSpeed and vLLM's external launcher read these
        port = str(_free_port())
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": port, OWN_GROUP: port})
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError("WORLD_SIZE and RANK are set but MASTER_ADDR / MASTER_PORT are not: start the run with "
                          "torchrun or deepspeed (docs/distributed.md), which set all four.")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def destroy() -> None:
    if initialized():
        tdist.destroy_process_group()


@_timed
def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


@_timed
def all_reduce(values, op: str = "sum") -> np.ndarray:
    """Element-wise sum (or max / min) of a float64 vector over the ranks (world size 1: unchanged)."""
    arr = np.asarray(values, dtype=np.float64)
    if world_size() == 1:
        return arr
    t = torch.as_tensor(arr, device=_reduce_device())
    tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}[op])
    return t.cpu().numpy()


@_timed
def all_reduce_tensor_(t: torch.Tensor) -> torch.Tensor:
    """Sum a (CPU) tensor over the ranks, in place."""
    if world_size() > 1:
        dev = _reduce_device()
        moved = t.to(dev)
        tdist.all_reduce(moved)
        t.copy_(moved.cpu() if dev.type != "cpu" else moved)
    return t


def all_reduce_dict(stats: dict[str, float]) -> dict[str, float]:
    """Sum each entry over the ranks (every rank must pass the same keys in the same order)."""
    if world_size() == 1 or not stats:
        return stats
    keys = list(stats)
    summed = all_reduce([stats[k] for k in keys])
    return {k: float(v) for k, v in zip(keys, summed)}


@_timed
def all_gather_object(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


@_timed
def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def agree(ok: bool) -> bool:
    """True when `ok` holds on every rank."""
    return bool(all_reduce([float(ok)], "min")[0]) if world_size() > 1 else ok


def any_true(flag: bool) -> bool:
    """True when `flag` holds on some rank (a signal that reached one rank stops them all at the same step)."""
    return bool(all_reduce([float(flag)], "max")[0]) if world_size() > 1 else flag


def first_error(error: BaseException | None):
    """Collective: re-raise on every rank the first rank's error (by rank) so no rank waits on a collective
    that a failed rank will never join."""
    errors = all_gather_object(None if error is None else (type(error).__name__, str(error)))
    for r, e in enumerate(errors):
        if e is not None:
            if error is not None:
                raise error
            from . import errors

            cls = getattr(errors, e[0], None)  # a user-facing error stays one (the stage handles it by class)
            if isinstance(cls, type) and issubclass(cls, errors.SrppoError):
                raise cls(f"rank {r}: {e[1]}")
            raise RuntimeError(f"rank {r} failed: {e[0]}: {e[1]}")
