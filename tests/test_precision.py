"""bf16 means bf16, and the memory plan is what runs: a tiny bf16 run of every stage kind (pretrain, sft, spin,
srppo with a critic, ppo_rm with a reward model, eval) on the torch engine, and on DeepSpeed ZeRO-3 over two
processes, traced by tests/scripts/traced_run.py:

  - every nn.Linear call of every phase (LM updates and held-out loss, SPIN's sampling, reference and update, RL
    rollout, scoring and update, eval) takes a bf16 input with a bf16 weight: frozen models included;
  - the parameter bytes each stage placed on each rank equal the --dry-run plan's for that model (ZeRO-3: the
    rank's shard of every parameter);
  - no model of a finished stage is alive (weak references) when the next stage places its own, nor at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import PHASES, QUICKSTART, require, tiny_run_overrides

SCRIPT = str(Path(__file__).parent / "scripts" / "traced_run.py")
TINY = ["spin.iterations=1", "spin.epochs=1", "spin.batch_size=4", "spin.rollout.max_new_tokens=8",
        "spin.max_prompt_len=32", "spin.max_seq_len=128", "spin.micro_batch_tokens=512",
        "srppo.max_steps=2", "srppo.prompts_per_step=4", "srppo.rollout.n_samples=2", "srppo.ppo.train_batch_size=4",
        "srppo.rollout.max_new_tokens=8", "srppo.max_prompt_len=32", "srppo.ppo.micro_batch_tokens=256",
        "srppo.critic.warmup_buffers=0", "srppo.eval_every=0", "srppo.reward.no_eos=keep",
        "sft.eval_every=1", "eval.max_new_tokens=8", "eval.splits=[world:eval_id]",
        "runtime.device=cpu", "runtime.precision=bf16"]


def traced(out: Path, extra: list[str], nproc: int = 1) -> list[dict]:
    result = out.parent / f"{out.name}.json"
    cmd = [sys.executable, SCRIPT, str(result), QUICKSTART, *tiny_run_overrides(out), *TINY, *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(result.with_name(f"{out.name}.rank{r}.json").read_text()) for r in range(nproc)]


def reward_model(out: Path) -> Path:
    """A tiny random sequence-classification model sharing the run's tokenizer (the PPO-RM baseline's)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from srppo_fast.modeling import load_tokenizer

    sft = out / "checkpoints" / "sft"
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(sft, num_labels=1))
    rm.save_pretrained(out.parent / "rm")
    load_tokenizer(str(sft)).save_pretrained(out.parent / "rm")
    return out.parent / "rm"


def check(results: list[dict], stages: set[str]) -> None:
    for r in results:
        assert r["error"] is None, r["error"]
        # 1. bf16 everywhere
        seen = {phase for phase, calls in r["trace"].items() if calls}
        wanted = {p for p in PHASES if p.split()[0] in {"lm", "spin", "rl", "eval"} and
                  ({"lm": {"pretrain", "sft"}, "spin": {"spin"}, "rl": {"srppo", "ppo_rm"}, "eval": {"eval"}}
                   [p.split()[0]] & stages)}
        assert wanted <= seen, f"phases without any linear call traced: {wanted - seen}"
        for phase, calls in r["trace"].items():
            dtypes = {(i, w) for i, w, _ in calls}
            assert dtypes == {("bfloat16", "bfloat16")}, f"{phase}: linear layers ran with (input, weight) {dtypes}"
        # 2. the plan's parameter bytes are the placed ones, model by model
        planned = {(stage, role): nbytes for stage, role, nbytes in r["plan"]}
        placed = [(stage, role, nbytes) for stage, role, nbytes, _ in r["loaded"]]
        assert {s for s, _, _ in placed} == stages
        for stage, role, nbytes in placed:
            assert planned.get((stage, role)) == nbytes, (stage, role, nbytes, planned.get((stage, role)))
        # 3. released: before the next stage places its models, and at the end
        assert not r["early_alive"], r["early_alive"]
        assert not [m for m in r["loaded"] if m[3]], [m for m in r["loaded"] if m[3]]


def test_torch_engine_bf16_run_computes_in_bf16_matches_the_plan_and_releases_its_models(tmp_path):
    out = tmp_path / "run"
    first = traced(out, ["stages=[pretrain,sft,spin,srppo,eval]"])
    check(first, {"pretrain", "sft", "spin", "srppo", "eval"})
    # the reward-model baseline on the same run (the finished stages are skipped)
    rm = reward_model(out)
    rl = [k.replace("srppo.", "ppo_rm.") for k in TINY if k.startswith("srppo.")]
    second = traced(out, ["stages=[pretrain,sft,ppo_rm]", f"ppo_rm.reward.model_path={rm}", "ppo_rm.init=sft",
                          "ppo_rm.critic.init=sft", *rl])
    check(second, {"ppo_rm"})
    roles = {role for _, role, _, _ in second[0]["loaded"]}
    assert roles == {"actor", "critic", f"frozen {rm}", "frozen sft"}
    assert first[0]["world_size"] == 1


@pytest.mark.deepspeed
def test_deepspeed_zero3_two_processes_bf16_run_matches_the_plan_shard_by_shard(tmp_path):
    require("deepspeed")
    results = traced(tmp_path / "run", ["stages=[pretrain,sft,spin,srppo,eval]", "runtime.engine=deepspeed",
                                        "deepspeed.zero_stage=3"], nproc=2)
    assert [r["world_size"] for r in results] == [2, 2]
    check(results[:1], {"pretrain", "sft", "spin", "srppo", "eval"})  # rank 0 runs eval
    check(results[1:], {"pretrain", "sft", "spin", "srppo"})
    shard = {(s, role): b for s, role, b, _ in results[1]["loaded"]}
    whole = {(s, role): b for s, role, b, _ in results[0]["loaded"] if s == "eval"}
    assert shard[("srppo", "frozen sft")] < whole[("eval", "frozen sft")]  # sharded over the two ranks


def test_a_bf16_run_killed_mid_save_resumes_to_the_uninterrupted_weights(tmp_path):
    """bf16 on the torch engine: the checkpoint holds the fp32 masters and the optimizer state, so a run killed
    in the middle of its second save and run again ends with the uninterrupted run's weights, bit for bit."""
    from safetensors.torch import load_file

    args = [sys.executable, "-m", "tests.faulty", "train", "--config", QUICKSTART, "stages=[pretrain]",
            "pretrain.max_steps=3", "pretrain.save_every=1", "runtime.device=cpu", "runtime.precision=bf16",
            "runtime.num_threads=1"]
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "OMP_NUM_THREADS": "1"}

    def run(out: Path, **extra_env) -> subprocess.CompletedProcess:
        return subprocess.run([*args, *tiny_run_overrides(out)], capture_output=True, text=True, timeout=600,
                              env={**env, **extra_env})

    trace = tmp_path / "trace"
    whole = run(tmp_path / "whole", SRPPO_FAST_TEST_FS_TRACE=str(trace))
    assert whole.returncode == 0, whole.stderr[-3000:]
    writes = [int(line.split(" ", 1)[0]) for line in trace.read_text().splitlines()
              if line.split(" ", 1)[1] == "write model"]
    assert run(tmp_path / "killed", SRPPO_FAST_TEST_KILL_AT=str(writes[1])).returncode != 0
    resumed = run(tmp_path / "killed")
    assert resumed.returncode == 0 and "resum" in resumed.stderr.lower(), resumed.stderr[-3000:]
    a = load_file(tmp_path / "whole" / "checkpoints" / "pretrain" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoints" / "pretrain" / "model.safetensors")
    assert a.keys() == b.keys() and all(t.dtype == torch.float32 for t in a.values())  # the fp32 masters
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.deepspeed
def test_a_zero3_stage_that_fails_releases_its_model_all_the_same(tmp_path):
    """A ZeRO-3 pretraining that diverges (lr 1e6) ends with its one-line error, and its model is freed anyway:
    the runner closes a stage's engines however the stage ends (DeepSpeed's global references would keep a ZeRO-3
    model for good otherwise)."""
    require("deepspeed")
    (r,) = traced(tmp_path / "run", ["stages=[pretrain]", "runtime.engine=deepspeed", "deepspeed.zero_stage=3",
                                     "pretrain.optim.lr=1e6", "pretrain.optim.warmup_ratio=0",
                                     "runtime.max_nonfinite_steps=1"])
    assert r["error"] and "optimizer steps in a row had a non-finite loss" in r["error"]
    assert r["loaded"] and not [m for m in r["loaded"] if m[3]], r["loaded"]
