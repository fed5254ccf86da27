"""One run per output directory, and workers that do not outlive their launcher.

**The lock.** A run holds an exclusive `flock` on `OUTPUT_DIR/.srppo.lock` for its whole life, taken by rank 0 of
the launch after every check passed and before anything is written (the other ranks learn the outcome through
the process group, so a launch is refused as a whole). A second `srppo-fast train` on the same directory, from
another terminal, a retry or workers left behind by a killed launcher, is refused at once with one line naming
the directory and the process that holds it (the lock file records its pid, host, start and command). The
kernel drops a `flock` when its holder dies however it dies (SIGKILL, power loss; on NFS the server's lock lease
expires with a dead client), so a stale lock is never a reason to refuse: the next run simply takes it. Readers
(`srppo-fast report`, `profile` into its own `profile/` directory) take no lock.

**The launcher watchdog.** Under torchrun or the deepspeed launcher every worker watches its parent, the
launcher's agent: when it is gone (killed with SIGKILL, its node's session ended), the worker sends itself
SIGTERM, which the stages honour as always (finish the step, save a resumable checkpoint, stop), instead of
training on alone, orphaned, holding the directory. The ranks stop together: a stop request on any rank is
agreed at the next step boundary.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from .errors import SrppoError

log = logging.getLogger("srppo_fast")
LOCK_FILE = ".srppo.lock"


class RunLockedError(SrppoError):
    """Another live run holds the output directory."""

    exit_code = 2


def _describe(holder: dict) -> str:
    if not holder:
        return "another srppo-fast process (it has not recorded itself yet)"
    command = " ".join(holder.get("argv", []))[:200]
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, running since {holder.get('started', '?')}"
            + (f": {command}" if command else ""))


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


class RunLock:
    """The exclusive lock of one run on its output directory (see the module doc)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self._fh = None

    def acquire(self) -> None:
        """Take the lock, or raise RunLockedError naming the holder. Creates output_dir if it does not exist."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+", encoding="utf-8")  # not truncated: the holder's record stays readable
        except OSError as e:
            raise RunLockedError(f"cannot lock output_dir {self.out} ({e.strerror or e}); make it writable or choose "
                                 "another output_dir.") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RunLockedError(f"output_dir {self.out} is in use by another run "
                                 f"({_describe(_read_holder(self.path))})"
                                 "; wait for it to finish or stop it, or give this run another output_dir.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv}))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(out: str | Path) -> str | None:
    """Who holds `out` now (a description), or None when no live run does. Takes the lock for an instant only."""
    path = Path(out) / LOCK_FILE
    if not path.is_file():
        return None
    try:
        with open(path, "a+", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _describe(_read_holder(path))
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None
    except OSError:
        return None


def watch_launcher(interval: float = 0.5) -> threading.Thread | None:
    """Launched workers: a daemon thread that sends this process SIGTERM once its parent (the launcher's agent) is
    gone. Returns the thread, or None when the process was not started by a launcher."""
    from . import dist

    if not dist.launched():
        return None
    parent = os.getppid()
    if parent <= 1:
        return None

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                log.error("the launcher (pid %d) is gone: stopping this rank (a resumable save first, as for SIGTERM)",
                          parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="srppo-launcher-watch", daemon=True)
    thread.start()
    return thread
