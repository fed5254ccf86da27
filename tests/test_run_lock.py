"""One run per output directory (srppo_fast/lock.py), with real processes: a second run on a live directory is
refused at once naming the holder and changes nothing; readers keep working; a lock left by a SIGKILLed run is
taken over; launched workers whose launcher is SIGKILLed save and stop instead of training on alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srppo_fast.lock import lock_holder
from srppo_fast.metrics import read_metrics

from .helpers import QUICKSTART, require, tiny_run_overrides

LONG = ["stages=[pretrain]", "pretrain.max_steps=100000", "pretrain.save_every=0", "pretrain.batch_size=4",
        "runtime.device=cpu", "runtime.precision=fp32", "runtime.num_threads=1"]


def start(out: Path, extra: list[str], nproc: int = 1) -> subprocess.Popen:
    cli = ["-m", "srppo_fast", "train", "--config", QUICKSTART, *tiny_run_overrides(out), *LONG, *extra]
    if nproc > 1:
        cli = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *cli], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def last_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    return max((r["step"] for r in read_metrics(path) if "loss" in r), default=0) if path.is_file() else 0


def wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    """Until the run has logged training step `step` (it is inside its stage loop: past start-up, a resume's
    dropped rows rewritten)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if last_step(out) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached within {timeout} s")


def test_a_second_run_is_refused_readers_work_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = start(out, [])
    try:
        wait_for_step(out, first, 3)
        second = subprocess.run([sys.executable, "-m", "srppo_fast", "train", "--config", QUICKSTART,
                                 *tiny_run_overrides(out), *LONG], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"output_dir {out} is in use by another run (pid {first.pid} on " in lines[0], \
            second.stderr[-2000:]
        dry = subprocess.run([sys.executable, "-m", "srppo_fast", "train", "--config", QUICKSTART, "--dry-run",
                              *tiny_run_overrides(out), *LONG], capture_output=True, text=True, timeout=120)
        assert dry.returncode == 0 and f"is IN USE by another run (pid {first.pid}" in dry.stdout
        report = subprocess.run([sys.executable, "-m", "srppo_fast", "report", str(out)], capture_output=True,
                                text=True, timeout=300)
        assert report.returncode == 0, report.stderr[-2000:]  # a reader takes no lock
        assert first.poll() is None  # the live run never noticed
        first.send_signal(signal.SIGINT)  # it saves and stops, as documented
        _, err = first.communicate(timeout=120)
        assert first.returncode == 130, err[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows, none twice
    assert lock_holder(out) is None

    resumed = start(out, [])
    try:
        wait_for_step(out, resumed, steps[-1] + 2)
        os.killpg(resumed.pid, signal.SIGKILL)  # nothing it can handle: the kernel drops its lock
        resumed.wait(timeout=60)
    finally:
        if resumed.poll() is None:
            resumed.kill()
    killed_at = last_step(out)
    taker = start(out, [])  # takes the directory over: no refusal, a resume of the last save
    try:
        wait_for_step(out, taker, killed_at + 1)
        assert taker.poll() is None
        taker.send_signal(signal.SIGINT)
        _, err = taker.communicate(timeout=120)
    finally:
        if taker.poll() is None:
            taker.kill()
    assert taker.returncode == 130 and "resuming pretrain from step" in err, err[-2000:]


@pytest.mark.deepspeed
def test_workers_stop_with_a_save_when_their_launcher_is_killed(tmp_path):
    """torchrun's agent SIGKILLed: its two workers, orphaned, notice (they watch their parent), save a resumable
    checkpoint as for SIGTERM and exit, releasing the directory; the same command then resumes."""
    require("deepspeed")
    out = tmp_path / "run"
    launcher = start(out, ["runtime.engine=deepspeed", "deepspeed.zero_stage=2"], nproc=2)
    try:
        wait_for_step(out, launcher, 2)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert len(workers) == 2, workers
        os.kill(launcher.pid, signal.SIGKILL)  # the agent only: its workers live on, orphaned
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() and
                                                  "zombie" not in Path(f"/proc/{w}/status").read_text().lower()
                                                  for w in workers):
            time.sleep(0.2)
        alive = [w for w in workers if Path(f"/proc/{w}").exists()
                 and "zombie" not in Path(f"/proc/{w}/status").read_text().lower()]
        assert not alive, f"workers {alive} train on without their launcher"
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert (out / "checkpoints" / "pretrain" / "trainer_state.pt").is_file()  # the save they made on the way out
    assert lock_holder(out) is None
