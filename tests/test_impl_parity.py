"""The trainer through the Triton kernels (interpreted on CPU) gives the metrics it gives through the
PyTorch references: pretrain, SFT and a few SRPPO steps, run twice with SRPPO_FAST_IMPL forced."""

from __future__ import annotations

import math

from .helpers import TINY_RL, require, tiny_run_overrides

require("triton")

from srppo_fast.cli import main  # noqa: E402
from srppo_fast.metrics import read_metrics  # noqa: E402

DETERMINISTIC = ("loss", "eval_loss", "grad_norm", "reward/coherent", "reward/total", "reward/kl", "kl", "pg_loss",
                 "value_loss", "entropy", "clip_frac", "approx_kl", "explained_variance", "response_length",
                 "log_ratio/p95", "sample/accuracy")


def _run(tmp_path, impl, monkeypatch) -> tuple[list[dict], str]:
    from srppo_fast.ops import _triton

    _triton._noted.clear()  # each run logs its implementations afresh
    monkeypatch.setenv("SRPPO_FAST_IMPL", impl)
    out = tmp_path / impl
    args = [*tiny_run_overrides(out), *TINY_RL, "srppo.max_steps=3", "srppo.advantage.estimator=gae",
            "srppo.reward.granularity=token", "srppo.kl.estimator=k3", "stages=[pretrain,sft,srppo]"]
    assert main(["train", "--config", "configs/quickstart.yaml", *args]) == 0
    return read_metrics(out / "metrics.jsonl"), (out / "train.log").read_text()


def test_triton_and_torch_runs_agree(tmp_path, monkeypatch):
    (triton_rows, triton_log), (torch_rows, torch_log) = (_run(tmp_path, "triton", monkeypatch),
                                                          _run(tmp_path, "torch", monkeypatch))
    # the kernels really ran (each op says once which implementation it took)
    for op in ("linear_token_logprobs", "coherent_gae", "ppo_loss"):
        assert f"{op}: Triton kernel (interpreted on the CPU)" in triton_log, op
        assert f"{op}: Triton kernel" not in torch_log
    assert len(triton_rows) == len(torch_rows)
    compared = 0
    for a, b in zip(triton_rows, torch_rows):
        assert (a["stage"], a.get("step")) == (b["stage"], b.get("step"))
        for key in DETERMINISTIC:
            if key in b:
                assert math.isclose(a[key], b[key], rel_tol=2e-3, abs_tol=2e-4), (a["stage"], a["step"], key,
                                                                                   a[key], b[key])
                compared += 1
    assert compared > 40
    assert {r["stage"] for r in triton_rows} == {"pretrain", "sft", "srppo"}
