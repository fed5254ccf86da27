"""A run killed (SIGKILL: nothing the program can handle) at every filesystem step of a checkpoint save
resumes from the last complete save, ends with the weights and metrics of an uninterrupted run, and
leaves nothing behind. The kill comes from the test-only hook in srppo_fast/io.py (`fs_step`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from srppo_fast.cli import main
from srppo_fast.metrics import read_metrics

from .helpers import QUICKSTART, TINY_ARCH, TINY_WORLD

# SFT from a scratch model: 3 steps, a save after each; held-out loss rows at the start and the end
RUN = ["logging.backends=[jsonl]", "stages=[sft]", "sft.init=base", "sft.max_steps=3", "sft.save_every=1",
       "sft.batch_size=4", "sft.eval_data=world:demos_heldout", "runtime.progress=false", "runtime.num_threads=1",
       *[f"world.{k}={v}" for k, v in TINY_WORLD.items()], *[f"model.arch.{k}={v}" for k, v in TINY_ARCH.items()]]
VOLATILE = {"time", "tokens_per_s"}


def _args(out: Path) -> list[str]:
    return ["train", "--config", QUICKSTART, f"output_dir={out}", *RUN]


def _subprocess(out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.faulty", *_args(out)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def _metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(out / "metrics.jsonl")]


def _tree(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if "world" not in p.parts)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (a subprocess, tracing every filesystem step of its saves) and an output dir
    holding only the embedded world, for the killed runs to start from."""
    root = tmp_path_factory.mktemp("crash")
    seed = root / "seed"
    assert main(["world", "--out", str(seed / "world"), *[f"world.{k}={v}" for k, v in TINY_WORLD.items()]]) == 0
    ref = root / "ref"
    shutil.copytree(seed, ref)
    trace = root / "trace.txt"
    done = _subprocess(ref, SRPPO_FAST_TEST_FS_TRACE=str(trace))
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [line.split(" ", 1) for line in trace.read_text().splitlines()]
    return {"root": root, "seed": seed, "ref": ref, "steps": [(int(n), label) for n, label in steps]}


def _saves(steps: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """The filesystem steps of each checkpoint save, in order (a save starts by creating .sft.tmp)."""
    saves: list[list[tuple[int, str]]] = []
    for n, label in steps:
        if label == "create .sft.tmp":
            saves.append([])
        if saves:
            saves[-1].append((n, label))
    return saves


def _kill_points():
    """(save index, position in the save) for the save after step 2 (it replaces step 1's) and the final one."""
    return [(save, i) for save, length in ((1, 10), (2, 9)) for i in range(length)]


def test_the_save_sequence_is_what_the_kill_test_walks(reference):
    saves = _saves(reference["steps"])
    assert len(saves) == 3  # after steps 1 and 2 (resumable) and the final, complete one
    labels = [label for _, label in saves[1]]
    assert labels == ["create .sft.tmp", "write model", "write tokenizer", "write trainer_state.pt",
                      "write srppo_checkpoint.json", "write .sft.tmp/.srppo_manifest.json", "rename sft -> .sft.old",
                      "rename .sft.tmp -> sft", "delete .sft.old", "saved sft"]
    assert [label for _, label in saves[2]] == [x for x in labels if "trainer_state" not in x]


@pytest.mark.parametrize("save,position", _kill_points())
def test_sigkill_at_every_step_of_a_save(reference, tmp_path, save, position):
    sequence = _saves(reference["steps"])[save]
    n, label = sequence[position]
    manifest = next(i for i, (_, x) in enumerate(sequence) if x.endswith(".srppo_manifest.json"))
    out = tmp_path / "run"
    shutil.copytree(reference["seed"], out)
    killed = _subprocess(out, SRPPO_FAST_TEST_KILL_AT=str(n))
    assert killed.returncode == -9, f"not killed at step {n} ({label}): {killed.stderr[-2000:]}"
    manifest_written = position > manifest  # killed before that step: the new copy was not complete yet
    # the same command again: recovery, then resume from the last complete save
    assert main(_args(out)) == 0
    log = (out / "train.log").read_text().split("srppo-fast: run in")[-1]  # the second run's lines
    last_complete = save + 1 if manifest_written else save  # the step whose copy was complete at the kill
    if last_complete == 3:
        assert "already complete" in log, log  # the final copy was complete: nothing to redo
    else:
        assert f"resuming sft from step {last_complete}" in log, log
    if position in (manifest + 1, manifest + 2):  # killed between the manifest and the second rename: finished
        assert "a save interrupted after it was complete was finished" in log, log
    # the result is the uninterrupted run's, bit for bit, and nothing is left behind
    ref = reference["ref"]
    assert _metrics(out) == _metrics(ref)
    for name in ("model.safetensors", "srppo_checkpoint.json"):
        assert (out / "checkpoints/sft" / name).read_bytes() == (ref / "checkpoints/sft" / name).read_bytes(), name
    assert _tree(out) == _tree(ref)
