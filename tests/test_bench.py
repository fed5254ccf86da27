"""The benchmark scripts run (CPU, small sizes): `srppo-fast bench --quick` for every op. No timing is
asserted: speed is claimed from benchmarks/results/*.csv, never from tests."""

from __future__ import annotations

import re

import pytest

from srppo_fast.cli import main


@pytest.mark.parametrize("op", ["logprobs", "linear_logprobs", "gae", "ppo_loss"])
def test_kernel_benchmarks_run(op, capsys):
    pytest.importorskip("triton")
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
