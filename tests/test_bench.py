"""The benchmark scripts run (CPU, small sizes): `srppo-fast bench --quick` for every op. No timing is
asserted: speed is claimed from benchmarks/results/*.csv, never from tests."""

from __future__ import annotations

import re

import pytest

from srppo_fast.cli import main

from .helpers import require


@pytest.mark.parametrize("op", ["logprobs", "linear_logprobs", "gae", "ppo_loss"])
def test_kernel_benchmarks_run(op, capsys):
    require("triton")
    assert main(["bench", "--op", op, "--quick", "--providers", "torch,ours" if op != "gae" else "loop,ours,ours_fused",
                 "--modes", "full" if op != "gae" else "fwd"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if " ms " in line]
    providers = {line.split()[1] for line in rows}
    assert providers == ({"torch", "ours"} if op != "gae" else {"loop", "ours", "ours_fused"}), out
    assert all(float(re.search(r"([\d.]+) ms ", line).group(1)) > 0 for line in rows)


def test_packing_benchmark_runs(capsys):
    assert main(["bench", "--op", "packing", "--quick"]) == 0
    assert "speedup" in capsys.readouterr().out


def test_gpu_e2e_runs_end_to_end_at_toy_size(tmp_path):
    """benchmarks/gpu_e2e.py, every phase at toy size on the CPU (TRL's too: it is in the dev extra), so the
    script a lent GPU runs cannot rot: each phase ends 'ok' (the GPU-only test phase says it skipped) and its row
    carries what the GPU run reports."""
    import csv
    import os
    import subprocess
    import sys

    out = tmp_path / "e2e.csv"
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "OMP_NUM_THREADS": "2"}
    # deadlines guard a lent GPU's minutes; here they would only measure how loaded the machine is: x10
    done = subprocess.run([sys.executable, "benchmarks/gpu_e2e.py", "--toy", "--slack", "10", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    status = {(r["phase"], r["engine"]): r["status"] for r in rows}
    assert status == {("matmul", ""): "ok", ("build", ""): "ok", ("fused_op", ""): "ok", ("gpu_tests", ""): "skipped",
                      ("trl", "trl"): "ok", ("sft", "torch"): "ok", ("srppo", "torch"): "ok",
                      ("sft", "deepspeed"): "ok", ("srppo", "deepspeed"): "ok"}, status
    by = {(r["phase"], r["engine"]): r for r in rows}
    assert all(float(by[("sft", e)]["tokens_per_s"]) > 0 and by[("sft", e)]["mfu"] for e in ("torch", "deepspeed"))
    assert all(float(by[("srppo", e)]["samples_per_s"]) > 0 and float(by[("srppo", e)]["ratio_vs_trl"]) > 0
               for e in ("torch", "deepspeed"))
    assert all(r["hardware"].startswith("CPU") and r["git_sha"] for r in rows)
