"""The DeepSpeed engine, for real: DeepSpeed 0.19.8 with its CPU accelerator and gloo, one process and two
(`torchrun --standalone --nproc_per_node 2`), ZeRO-2 and ZeRO-3, against the torch engine.

Every run is the CLI in a subprocess (a process group cannot be torn down and rebuilt inside pytest). fp32
throughout (PLATFORM.md: bf16 differs by ~5e-5 between world sizes). Adam's eps is 1e-6 in these runs: with
1e-8, a coordinate whose gradient is ~0 turns rounding noise in the reduced gradient (another summation
order) into a full-size lr step of either sign, a difference of the order of lr that says nothing about the
engine; 1e-6 keeps such coordinates still and leaves every real update as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import (
    IN_CI,
    QUICKSTART,
    TINY_ARCH,
    TINY_WORLD,
    expected,
    require,
    same,
    tb_read,
    wandb_points,
    wandb_rows,
)

require("deepspeed")
pytestmark = pytest.mark.deepspeed

from safetensors.torch import load_file  # noqa: E402

TOL = 1e-5
RUN = [*(f"world.{k}={v}" for k, v in TINY_WORLD.items()), *(f"model.arch.{k}={v}" for k, v in TINY_ARCH.items()),
       "runtime.progress=false", "runtime.device=cpu", "runtime.precision=fp32", "logging.backends=[jsonl]",
       "stages=[pretrain,sft,srppo]", "pretrain.max_steps=3", "pretrain.batch_size=16",
       "pretrain.micro_batch_tokens=512", "sft.max_steps=2", "sft.batch_size=4", "sft.micro_batch_tokens=256",
       "sft.optim.lr=1e-3", "srppo.max_steps=1", "srppo.prompts_per_step=4", "srppo.rollout.n_samples=2",
       "srppo.ppo.train_batch_size=4", "srppo.rollout.max_new_tokens=12", "srppo.max_prompt_len=32",
       "srppo.ppo.micro_batch_tokens=256", "srppo.critic.warmup_buffers=0", "srppo.eval_every=0",
       "srppo.optim.lr=1e-4", "srppo.critic.optim.lr=1e-4", "srppo.reward.no_eos=keep",
       *(f"{s}.optim.eps=1e-6" for s in ("pretrain", "sft", "srppo", "srppo.critic"))]
METRICS = ("loss", "eval_loss", "grad_norm", "pg_loss", "value_loss", "reward/total", "kl", "actor_grad_norm",
           "critic_grad_norm")


def launch(out: Path, extra: list[str], nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    """`srppo-fast train` in 1 process, or under torchrun in `nproc`."""
    cli = ["-m", "tests.faulty", "train", "--config", QUICKSTART, f"output_dir={out}", *RUN, *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    else:
        cmd = [sys.executable, *cli]
    full_env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def metrics(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["stage"], r["step"], tuple(sorted(k for k in r if k in METRICS))) for r in rows]
    assert len(keys) == len(set(keys)), "a (stage, step) row was logged twice (every rank logging?)"
    return {(r["stage"], r["step"], i): r for i, r in enumerate(rows)}


def weights(out: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / stage / "model.safetensors")


def assert_same_run(a: Path, b: Path, stages=("pretrain", "sft", "srppo", "srppo/critic"), tol: float = TOL):
    ra, rb = metrics(a), metrics(b)
    assert [k[:2] for k in ra] == [k[:2] for k in rb]
    compared = 0
    for key, row in ra.items():
        for m in METRICS:
            if m in row:
                assert abs(row[m] - rb[key][m]) <= tol * max(1.0, abs(row[m])), (key, m, row[m], rb[key][m])
                compared += 1
    assert compared >= 10
    for stage in stages:
        wa, wb = weights(a, stage), weights(b, stage)
        assert wa.keys() == wb.keys()
        worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        assert worst <= tol, (stage, worst)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs by name, made on first use: 'torch' (the reference) and 'ds-<processes>-zero<stage>'."""
    root = tmp_path_factory.mktemp("ds")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            out = root / name
            if name == "torch":
                ok(launch(out, ["runtime.engine=torch"]))
            else:
                _, nproc, zero = name.split("-")
                # one of the runs logs to every backend: rank 0 alone writes them (test_trackers_are_written_once)
                backends = ["logging.backends=[jsonl,tensorboard,wandb]"] if name == "ds-2-zero2" else []
                ok(launch(out, ["runtime.engine=deepspeed", f"deepspeed.zero_stage={zero[4:]}", *backends], int(nproc)))
            made[name] = out
        return made[name]

    return get


@pytest.mark.parametrize("name", ["ds-1-zero2", "ds-2-zero0", "ds-2-zero2", "ds-2-zero3"])
def test_deepspeed_matches_the_torch_engine(runs, name):
    """Pretrain, SFT and an SRPPO step (rollout, scoring with frozen models, GAE with a critic, PPO update) give
    the torch engine's losses and weights, whatever the world size and ZeRO stage (the same global batches)."""
    assert_same_run(runs("torch"), runs(name))
    log = (runs(name) / "train.log").read_text()
    assert "deepspeed engine" in log
    if name.startswith("ds-2"):
        rows = [r for r in metrics(runs(name)).values() if r["stage"] in ("pretrain", "srppo") and
                ("loss" in r or "pg_loss" in r)]
        assert {r["stage"] for r in rows} == {"pretrain", "srppo"}
        assert all(1.0 <= r["rank_imbalance"] < 1.5 and r["time/comm"] > 0 for r in rows)


@pytest.mark.requires("tensorboard", "wandb")
def test_trackers_are_written_once_by_rank_0(runs):
    """Two processes: each stage has one TensorBoard events file and one W&B session, holding each step once, the
    same numbers as metrics.jsonl."""
    out = runs("ds-2-zero2")
    for stage in ("pretrain", "sft", "srppo"):
        assert len(list((out / "tensorboard" / stage).glob("events.out.tfevents.*"))) == 1, stage
        assert len(list((out / "wandb").glob(f"offline-run-*-{stage}-*"))) == 1, stage
        same(tb_read(out / "tensorboard" / stage)[0], expected(out, stage))
        same(wandb_points(wandb_rows(out, stage)), expected(out, stage))


def test_bf16_under_zero3_trains(tmp_path):
    """bf16 (DeepSpeed keeps fp32 master weights; the modules compute in bf16): the same run trains, its losses
    finite and within bf16's reach of the fp32 reference's first steps, and the checkpoint loads."""
    out = tmp_path / "bf16"
    ok(launch(out, ["runtime.engine=deepspeed", "deepspeed.zero_stage=3", "runtime.precision=bf16",
                    "stages=[pretrain,sft]"], 2))
    rows = [r for r in metrics(out).values() if "loss" in r]
    assert len(rows) == 5 and all(0 < r["loss"] < 10 and r["skipped"] == 0 for r in rows)
    assert checkpoint_complete(out, "sft")


def checkpoint_complete(out: Path, stage: str) -> bool:
    info = json.loads((out / "checkpoints" / stage / "srppo_checkpoint.json").read_text())
    return bool(info["complete"])


def test_zero3_checkpoint_is_a_plain_hf_directory(runs):
    """The Hugging Face directory written under ZeRO-3 (gathered from the shards) loads in plain transformers
    and gives the torch engine's log-probs; so does the critic's."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    ids = torch.arange(3, 40).unsqueeze(0)
    for stage in ("sft", "srppo"):
        a = AutoModelForCausalLM.from_pretrained(runs("torch") / "checkpoints" / stage)
        b = AutoModelForCausalLM.from_pretrained(runs("ds-2-zero3") / "checkpoints" / stage)
        la, lb = (m(ids).logits.log_softmax(-1) for m in (a, b))
        assert float((la - lb).abs().max()) <= 1e-4
    critic = AutoModelForTokenClassification.from_pretrained(runs("ds-2-zero3") / "checkpoints" / "srppo" / "critic")
    assert critic(ids).logits.shape == (1, ids.shape[1], 1)
    assert not (runs("ds-2-zero3") / "checkpoints" / "srppo" / "deepspeed").exists()  # final: no resumable state


def test_kill_and_resume_at_world_size_2_then_at_world_size_1(tmp_path):
    """Two processes, ZeRO-2, a save every 2 steps: SIGKILL rank 0 while it writes the second save (after every
    rank wrote its DeepSpeed shards into the temporary directory); the same command resumes from the first save
    and ends where an uninterrupted run does. The same interrupted run resumed by one process goes through
    DeepSpeed's universal checkpoint, says so, and reaches the same place within rounding."""
    extra = ["stages=[pretrain]", "pretrain.max_steps=6", "pretrain.save_every=2", "runtime.engine=deepspeed",
             "deepspeed.zero_stage=2"]
    whole, trace = tmp_path / "whole", tmp_path / "trace"
    ok(launch(whole, extra, 2, {"SRPPO_FAST_TEST_FS_TRACE": str(trace)}))
    steps = [line.split(" ", 1) for line in trace.read_text().splitlines()]
    writes = [int(n) for n, label in steps if label == "write model"]
    assert len(writes) >= 3  # saves after steps 2 and 4, and the final one
    killed = tmp_path / "killed"
    proc = launch(killed, extra, 2, {"SRPPO_FAST_TEST_KILL_AT": str(writes[1])})
    assert proc.returncode != 0
    leftovers = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ".pretrain.tmp" in leftovers  # killed mid-save: the half-written directory is there
    assert list((killed / "checkpoints" / ".pretrain.tmp" / "deepspeed" / "model" / "state").iterdir())
    single = tmp_path / "single"
    shutil.copytree(killed, single)

    ok(launch(killed, extra, 2))
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["pretrain"]
    assert "resuming pretrain from step 2" in (killed / "train.log").read_text()
    assert_same_run(whole, killed, stages=("pretrain",), tol=1e-6)

    ok(launch(single, extra, 1))
    log = (single / "train.log").read_text()
    assert "resuming pretrain from step 2" in log and "universal checkpoint" in log
    assert_same_run(whole, single, stages=("pretrain",), tol=1e-5)


def test_engine_choices_that_contradict_are_refused(tmp_path):
    proc = launch(tmp_path / "a", ["runtime.engine=torch", "stages=[pretrain]"], 2)
    assert proc.returncode != 0 and "runtime.engine is 'torch' but the run was launched with 2" in proc.stderr
    proc = launch(tmp_path / "b", ["runtime.engine=deepspeed", "deepspeed.offload_param=true", "stages=[pretrain]"])
    assert proc.returncode != 0 and "offload_param needs deepspeed.zero_stage 3" in proc.stderr
    proc = launch(tmp_path / "c", ["runtime.engine=deepspeed", "deepspeed.config={gradient_clipping: 2}",
                                   "stages=[pretrain]"])
    assert proc.returncode != 0 and "deepspeed.config sets gradient_clipping" in proc.stderr
    proc = launch(tmp_path / "d", ["stages=[pretrain]"], env={"WORLD_SIZE": "2", "RANK": "0"})  # no launcher
    assert proc.returncode != 0 and "MASTER_ADDR / MASTER_PORT are not" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_a_torch_checkpoint_is_not_resumed_by_the_deepspeed_engine(tmp_path):
    extra = ["stages=[pretrain]", "pretrain.max_steps=4", "pretrain.save_every=2"]
    out = tmp_path / "run"
    trace = tmp_path / "trace"
    ok(launch(out, [*extra, "runtime.engine=torch"], env={"SRPPO_FAST_TEST_FS_TRACE": str(trace)}))
    writes = [int(line.split(" ", 1)[0]) for line in trace.read_text().splitlines()
              if line.split(" ", 1)[1] == "write model"]
    shutil.rmtree(out)
    assert launch(out, [*extra, "runtime.engine=torch"], env={"SRPPO_FAST_TEST_KILL_AT": str(writes[1])}).returncode
    config_yaml = (out / "config.yaml").read_text()
    proc = launch(out, [*extra, "runtime.engine=deepspeed"])
    assert proc.returncode != 0 and "saved by the torch engine but this run uses the deepspeed engine" in proc.stderr
    assert (out / "config.yaml").read_text() == config_yaml  # refused by the checks, before anything was written


def test_sigterm_to_the_launcher_saves_every_rank_and_the_same_command_resumes(tmp_path):
    """SIGTERM to torchrun reaches both ranks: they finish the step, save together (DeepSpeed state included)
    and stop with code 130 before the end; the same command resumes and logs every step exactly once."""
    import signal
    import time

    extra = ["stages=[pretrain]", "pretrain.max_steps=200", "pretrain.log_every=1", "runtime.engine=deepspeed"]
    out = tmp_path / "run"
    cli = ["-m", "srppo_fast", "train", "--config", QUICKSTART, f"output_dir={out}", *RUN, *extra]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *cli], env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        log = out / "metrics.jsonl"
        if log.is_file() and '"loss"' in log.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the run ended before the signal: raise pretrain.max_steps"
    info = json.loads((out / "checkpoints" / "pretrain" / "srppo_checkpoint.json").read_text())
    assert not info["complete"] and 1 <= info["step"] < 200, err[-3000:]
    assert (out / "checkpoints" / "pretrain" / "deepspeed" / "model" / "state").is_dir()
    assert "SIGTERM received" in (out / "train.log").read_text()
    ok(launch(out, extra, 2))
    steps = [r["step"] for r in metrics(out).values() if r["stage"] == "pretrain" and "loss" in r]
    assert steps == list(range(1, 201))


def test_the_deepspeed_launcher_runs_the_same_training(runs, tmp_path):
    """`deepspeed --num_gpus 2 --module srppo_fast train ...` (docs/distributed.md's command; the launcher passes
    --local_rank before the subcommand) trains like torchrun: the torch engine's pretraining, to 1e-5."""
    import socket

    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.is_file():
        (pytest.fail if IN_CI else pytest.skip)("no deepspeed launcher script beside this Python (the README's "
                                                 "install puts it in .venv/bin)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(port), "--module", "srppo_fast", "train",
           "--config", QUICKSTART, f"output_dir={out}", *RUN, "stages=[pretrain]"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1",
                                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"},
                          capture_output=True, text=True, timeout=600)
    ok(proc)
    ref = {k: r for k, r in metrics(runs("torch")).items() if r["stage"] == "pretrain"}
    got = metrics(out)
    assert [k[:2] for k in ref] == [k[:2] for k in got]
    pairs = [(a, b) for a, b in zip(ref.values(), got.values()) if "loss" in a]
    assert len(pairs) == 3 and all(abs(a["loss"] - b["loss"]) <= TOL for a, b in pairs)
    wa, wb = weights(runs("torch"), "pretrain"), weights(out, "pretrain")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= TOL


SPIN = ["stages=[pretrain,sft,spin]", "spin.iterations=2", "spin.epochs=1", "spin.batch_size=4",
        "spin.rollout.max_new_tokens=12", "spin.max_prompt_len=32", "spin.max_seq_len=128",
        "spin.micro_batch_tokens=512", "spin.optim.lr=1e-4", "spin.optim.warmup_ratio=0", "spin.optim.eps=1e-6"]


def test_spin_under_zero3_at_world_size_2_matches_the_torch_engine(tmp_path):
    """SPIN's sampling (each prompt its own stream), reference log-probs (each pair on one rank, summed over the
    ranks) and DPO steps (pairs packed whole, dummy micro-batches for a rank without pairs) give the one-process
    run's losses and weights under ZeRO-3 on two processes."""
    a, b = tmp_path / "torch", tmp_path / "zero3"
    ok(launch(a, ["runtime.engine=torch", *SPIN]))
    ok(launch(b, ["runtime.engine=deepspeed", "deepspeed.zero_stage=3", *SPIN], 2))
    assert_same_run(a, b, stages=("pretrain", "sft", "spin"))
    rows = [r for r in metrics(b).values() if r["stage"] == "spin" and "loss" in r]
    assert len(rows) == 4 and all(r["rank_imbalance"] >= 1.0 for r in rows)


@pytest.mark.parametrize("tied", ["0", "1"])
def test_a_zero3_sharded_head_keeps_the_fused_logprob_path(tmp_path, tied):
    """Under ZeRO-3 the lm_head is a shard outside its own call; the fused op runs inside that call (DeepSpeed
    gathers the weight for the forward and again for the backward's recomputation), so no [packed tokens, V]
    logits are made and the outputs and every gradient equal the plain model's (2 ranks, each its own
    micro-batch, untied and tied heads; tests/scripts/zero3_fused_head.py)."""
    result = tmp_path / "z3.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "tests/scripts/zero3_fused_head.py", str(result), tied], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"z3.rank{rank}.json").read_text())
        assert r["world"] == 2 and r["head_numel_outside_call"] == 0  # the head really is sharded
        assert r["fused_calls"] == {"forward": 1, "backward": 1}
        assert r["widest_vocab_rows"] == r["label_positions"] < r["packed_tokens"]  # chunks of label rows only
        assert r["logp_diff"] <= 1e-5 and r["entropy_diff"] <= 1e-5
        assert max(r["grad_diff"].values()) <= 1e-5, r["grad_diff"]


def test_a_step_of_several_micro_batches_is_their_whole_gradient_at_every_stage(tmp_path):
    """The stages run forwards on the module itself, not through DeepSpeed's forward, whose bookkeeping ZeRO
    relies on: without it ZeRO-3 kept only the last micro-batch of a step and ZeRO-1 in bf16 (BF16_Optimizer)
    counted some twice. Three micro-batches per step: every stage's gradient norm (the reduced, accumulated
    gradient) is the torch engine's, fp32 to 1e-5 and bf16 to 5e-3 relative, over two steps
    (tests/scripts/ds_accumulation.py)."""
    result = tmp_path / "norms.json"
    proc = subprocess.run([sys.executable, "tests/scripts/ds_accumulation.py", str(result)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    norms = json.loads(result.read_text())
    for name, got in norms.items():
        precision = name.rsplit("-", 1)[1]
        want = norms[f"torch-{precision}"]
        tol = 1e-5 if precision == "fp32" else 5e-3
        assert got == pytest.approx(want, rel=tol), (name, got, want)
