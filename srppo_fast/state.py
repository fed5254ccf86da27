"""Resumable training: what survives a restart, the signal guard, and loading it back.

A stage's checkpoint directory holds the Hugging Face model(s) and `srppo_checkpoint.json`. While the
stage runs, a resumable checkpoint also holds `trainer_state.pt`: optimiser and scheduler states, the
data position, RNG states and the stage's own running statistics, everything `train` needs to go on
from the last completed step and produce what an uninterrupted run would. The final checkpoint of a
stage drops `trainer_state.pt` (it is marked complete and is what later stages read).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, SrppoError
from .modeling import checkpoint_info

log = logging.getLogger("srppo_fast")
TRAINER_STATE = "trainer_state.pt"


class Interrupted(SrppoError):
    """Raised after a SIGINT/SIGTERM was honoured: the state was saved and the run can be resumed."""

    exit_code = 130


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class SignalGuard:
    """Within the block, SIGINT/SIGTERM only set `requested`, so the loop can finish its step, save, and
    stop; a second signal interrupts at once. Outside the main thread it does nothing."""

    def __init__(self):
        self.requested: str | None = None
        self._old = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = name
        log.warning("%s received: finishing this step, saving, then stopping (send it again to stop now)", name)

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and not issubclass(exc_type, (KeyboardInterrupt, Interrupted)):
            # failing already (a peer rank died: its launcher now sends this rank SIGTERM): a signal must not replace
            # the error that says what happened; the CLI restores the handlers when it returns
            for sig in self._old:
                signal.signal(sig, _noted_while_failing)
            return
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _noted_while_failing(signum, frame) -> None:
    log.warning("%s received while stopping on an error: already stopping", signal.Signals(signum).name)


def resumable(path: str | Path, fingerprint: dict) -> dict | None:
    """The saved trainer state of an unfinished checkpoint made by the same config, else None."""

    info = checkpoint_info(path)
    state_file = Path(path) / TRAINER_STATE
    if info is None or info.get("complete") or not state_file.is_file():
        return None
    if info.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path} holds an unfinished run of a different config (changed: "
                              f"{describe_changes(info.get('fingerprint'), fingerprint)}); use a new output_dir or "
                              "delete that checkpoint to start the stage over.")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    log.info("resuming %s from step %d", info.get("stage"), info["step"])
    return state


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _diff_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(prefix + k)
    return keys


def describe_changes(saved: dict, want: dict) -> str:
    """The config keys and data files that differ between two fingerprints, for a refusal."""
    keys = _diff_keys(saved or {}, want)
    data = sorted({spec for spec in (saved or {}).get("data", {}) | want.get("data", {})
                   if (saved or {}).get("data", {}).get(spec) != want.get("data", {}).get(spec)})
    keys = [k for k in keys if not k.startswith("data.") and k != "data"]
    parts = []
    if keys:
        parts.append("config keys " + ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else ""))
    for spec in data:
        parts.append(f"the data file '{spec}' (its contents changed since)" if spec in (saved or {}).get("data", {})
                     and spec in want.get("data", {}) else f"the data file '{spec}'")
    return "; ".join(parts) or "the saved fingerprint is missing"
