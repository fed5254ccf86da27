"""Faults end in one line and lose nothing: a full disk during a checkpoint save (a real tmpfs) or a metrics write,
a checkpoint file cut short, SIGTERM outside a training loop, a report killed mid-write, a dead peer rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from srppo_fast.metrics import read_metrics

from .helpers import QUICKSTART, require, tiny_run_overrides

RUN = ["stages=[pretrain]", "pretrain.max_steps=6", "pretrain.save_every=2", "runtime.device=cpu",
       "runtime.num_threads=1"]


def cli(out: Path, extra: list[str] = (), env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tests.faulty", "train", "--config", QUICKSTART,
                           *tiny_run_overrides(out), *RUN, *extra], capture_output=True, text=True, env=env,
                          timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("srppo-fast: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def allocated(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` bytes (root only; skipped where mounting is not permitted)."""
    mounted = []

    def mount(size: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"a small tmpfs is needed and mounting one is not permitted here ({done.stderr.strip()})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_full_disk_during_a_save_is_one_line_the_previous_checkpoint_survives_and_the_run_resumes(tmp_path,
                                                                                                   tmpfs):
    # how much a run holds right after its first resumable save, and how much that save is
    ref, trace = tmp_path / "ref", tmp_path / "trace"
    assert cli(ref, env={"SRPPO_FAST_TEST_FS_TRACE": str(trace)}).returncode == 0
    steps = [line.split(" ", 1) for line in trace.read_text().splitlines()]
    first_saved = next(int(n) for n, label in steps if label == "saved pretrain")
    stopped = tmp_path / "stopped"
    assert cli(stopped, env={"SRPPO_FAST_TEST_KILL_AT": str(first_saved + 1)}).returncode != 0
    held, save = allocated(stopped), allocated(stopped / "checkpoints" / "pretrain")
    # a disk with room for that and half a save more: the second save (a new copy beside the old) cannot fit
    disk = tmpfs(held + save // 2 + 64 * 1024)
    out = disk / "run"
    line = one_error_line(cli(out))
    assert f"saving the checkpoint {out}/checkpoints/pretrain failed: No space left on device" in line, line
    assert "is intact" in line
    from srppo_fast.io import manifest_problem
    from srppo_fast.modeling import checkpoint_info

    ckpt = out / "checkpoints" / "pretrain"
    assert checkpoint_info(ckpt)["step"] == 2 and manifest_problem(ckpt) is None  # the previous copy, whole
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # nothing half-written
    # space comes back (a bigger disk holding the same files): the same command resumes and finishes
    roomy = tmpfs(held + 4 * save)
    subprocess.run(["cp", "-a", str(out), str(roomy / "run")], check=True)
    done = cli(roomy / "run")
    assert done.returncode == 0 and "resuming pretrain from step 2" in done.stderr, done.stderr[-3000:]
    assert checkpoint_info(roomy / "run" / "checkpoints" / "pretrain")["complete"]


def test_a_full_disk_on_a_metrics_write_names_the_file(tmpfs):
    from srppo_fast.errors import StorageError
    from srppo_fast.metrics import MetricsLog

    disk = tmpfs(64 * 1024)
    log = MetricsLog(disk / "metrics.jsonl")
    with pytest.raises(StorageError, match=rf"cannot append to {disk}/metrics.jsonl: No space left on device"):
        for step in range(100_000):
            log.log({"stage": "sft", "step": step, "loss": 1.0, "note": "x" * 200})


def test_a_checkpoint_file_cut_short_is_named_before_anything_loads_it(tmp_path):
    out = tmp_path / "run"
    assert cli(out, ["pretrain.max_steps=4"], env={"SRPPO_FAST_TEST_KILL_AT": "1000000"}).returncode == 0
    state = out / "checkpoints" / "pretrain" / "model.safetensors"
    state.write_bytes(state.read_bytes()[:1000])  # a copy cut short
    line = one_error_line(cli(out, ["pretrain.max_steps=4"]))
    assert f"the checkpoint {out}/checkpoints/pretrain is damaged: {state} is 1,000 bytes but its save wrote" in line


def test_a_resumable_checkpoints_trainer_state_cut_short(tmp_path):
    out, trace = tmp_path / "run", tmp_path / "trace"
    assert cli(tmp_path / "ref", env={"SRPPO_FAST_TEST_FS_TRACE": str(trace)}).returncode == 0
    steps = [line.split(" ", 1) for line in trace.read_text().splitlines()]
    first_saved = next(int(n) for n, label in steps if label == "saved pretrain")
    assert cli(out, env={"SRPPO_FAST_TEST_KILL_AT": str(first_saved + 1)}).returncode != 0
    state = out / "checkpoints" / "pretrain" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:-7])
    line = one_error_line(cli(out))
    assert f"{state} is" in line and "but its save wrote" in line and "is damaged" in line


def test_sigterm_outside_a_training_loop_is_the_same_as_sigint(tmp_path):
    """During the eval stage (no training loop): SIGTERM and SIGINT both end with the same one line and 130."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        out = tmp_path / sig.name
        env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "srppo_fast", "train", "--config", QUICKSTART,
                                 *tiny_run_overrides(out), "stages=[pretrain,eval]", "pretrain.max_steps=2",
                                 "world.num_eval=300", "eval.max_new_tokens=48", "runtime.device=cpu"],
                                env=env, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(proc.stderr,), daemon=True)
        reader.start()
        deadline = time.monotonic() + 300
        while not any("stage 2/2: eval" in line for line in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        reader.join(timeout=10)
        assert proc.returncode == 130, (sig.name, proc.returncode, "".join(lines)[-2000:])
        assert f"srppo-fast: interrupted by {sig.name} outside a training loop" in "".join(lines)


def test_report_figures_are_written_atomically(tmp_path, monkeypatch):
    """A write that fails (a full disk, a kill) leaves the previous figure as it was, never a cut or empty PNG."""
    from srppo_fast import io as srppo_io
    from srppo_fast.report import make_report

    out = tmp_path / "run"
    out.mkdir()
    rows = [{"stage": "sft", "step": s, "loss": 1.0 / s, "time": s} for s in range(1, 6)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_report(out)
    png = out / "report" / "sft.png"
    before = png.read_bytes()
    assert before.startswith(b"\x89PNG")
    real = os.replace

    def disk_full(src, dst, *args, **kwargs):
        if str(dst).endswith(".png"):
            raise OSError(28, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(srppo_io.os, "replace", disk_full)
    rows.append({"stage": "sft", "step": 6, "loss": 0.1, "time": 6})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from srppo_fast.errors import StorageError

    with pytest.raises(StorageError, match=r"cannot write .*sft\.png: No space left on device"):
        make_report(out)
    assert png.read_bytes() == before
    assert not [p for p in (out / "report").iterdir() if p.name.startswith(".")]


def test_a_dead_peer_rank_is_one_line_naming_it(tmp_path):
    """Two processes (gloo): rank 1 is SIGKILLed in the middle of training; rank 0 ends at once with one line that
    names the rank that is gone and says the last checkpoint is safe, not gloo's traceback."""
    require("deepspeed")
    out = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "srppo_fast", "train", "--config", QUICKSTART, *tiny_run_overrides(out),
                             "stages=[pretrain]", "pretrain.max_steps=100000", "pretrain.save_every=0",
                             "pretrain.batch_size=4", "runtime.engine=deepspeed", "runtime.device=cpu"],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None
            path = out / "metrics.jsonl"
            if path.is_file() and len(read_metrics(path)) >= 3:
                break
            time.sleep(0.2)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        rank1 = next(int(w) for w in workers
                      if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{w}/environ").read_bytes())
        os.kill(rank1, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in err.splitlines() if line.startswith("srppo-fast: error: ")]
    assert lines and lines[0].startswith("srppo-fast: error: rank 0: rank 1 of this launch is gone"), err[-3000:]
    assert "The last complete checkpoint" in lines[0]
