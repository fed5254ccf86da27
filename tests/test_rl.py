"""The RL stages on a tiny world and model: every estimator and reward granularity, the reward-model
baseline, the eval table and report, contradicting options, and kill-and-resume equivalence."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from srppo_fast.cli import main
from srppo_fast.config_load import load_config
from srppo_fast.errors import ConfigError
from srppo_fast.metrics import read_metrics
from srppo_fast.modeling import checkpoint_info
from srppo_fast.runner import run

from .helpers import QUICKSTART, TINY_RL, kill_when, load_weights, step_rows, tiny_run_overrides, train_command

RL_KEYS = {"reward/coherent", "reward/kl", "reward/total", "kl", "entropy", "clip_frac", "approx_kl", "pg_loss",
           "response_length", "eos_rate", "samples_per_s", "time/generate", "time/score", "time/update",
           "sample/accuracy", "log_ratio/p95"}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny run with pretrain and sft done; RL tests copy it."""
    out = tmp_path_factory.mktemp("base")
    assert main(["train", "--config", QUICKSTART, *tiny_run_overrides(out), "stages=[pretrain,sft]"]) == 0
    return out


def rl_run(sft_run, tmp_path, extra, stages="[pretrain,sft,srppo]") -> Path:
    out = tmp_path / "run"
    shutil.copytree(sft_run, out)
    assert main(["train", "--config", QUICKSTART, *tiny_run_overrides(out), *TINY_RL, f"stages={stages}",
                 *extra]) == 0
    return out


@pytest.mark.parametrize("estimator", ["gae", "reinforce", "rloo", "grpo"])
@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_one_rl_run_per_estimator_and_granularity(sft_run, tmp_path, estimator, granularity):
    extra = [f"srppo.advantage.estimator={estimator}", f"srppo.reward.granularity={granularity}"]
    if estimator in ("rloo", "grpo"):
        extra += ["srppo.kl.placement=loss", "srppo.kl.estimator=k3"]  # GRPO-style KL in the loss, also exercised here
    out = rl_run(sft_run, tmp_path, extra)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "srppo"]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert RL_KEYS <= set(r), RL_KEYS - set(r)
        assert all(isinstance(v, (int, float)) for k, v in r.items() if k not in ("stage",))
    if estimator == "gae":
        assert {"value_loss", "explained_variance", "critic_grad_norm"} <= set(rows[-1])
    else:
        assert "value_loss" not in rows[-1]
    info = checkpoint_info(out / "checkpoints" / "srppo")
    assert info["complete"] and info["step"] == 2
    assert not (out / "checkpoints" / "srppo" / "trainer_state.pt").exists()  # final checkpoints are lean
    # the actor moved away from pi_SFT
    from safetensors.torch import load_file

    actor = load_file(out / "checkpoints" / "srppo" / "model.safetensors")
    sft = load_file(out / "checkpoints" / "sft" / "model.safetensors")
    assert any(not torch.equal(actor[k], sft[k]) for k in actor)


def test_critic_warmup_freezes_the_actor(sft_run, tmp_path):
    out = rl_run(sft_run, tmp_path, ["srppo.critic.warmup_buffers=1"])
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "srppo"]
    assert [r["actor_trained"] for r in rows] == [0.0, 1.0]
    assert "pg_loss" not in rows[0] and "pg_loss" in rows[1]
    assert "value_loss" in rows[0]


def test_ppo_with_an_external_reward_model(sft_run, tmp_path):
    """PPO-RM baseline: a real (tiny, random) sequence-classification model from a directory."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from srppo_fast.modeling import load_tokenizer

    tok = load_tokenizer(str(sft_run / "checkpoints" / "sft"))
    rm_config = AutoConfig.from_pretrained(sft_run / "checkpoints" / "sft", num_labels=1)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(rm_config)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    extra = [f"ppo_rm.reward.model_path={tmp_path / 'rm'}", "ppo_rm.init=sft", "ppo_rm.critic.init=sft",
             *[k.replace("srppo.", "ppo_rm.") for k in TINY_RL]]
    out = rl_run(sft_run, tmp_path, extra, stages="[pretrain,sft,ppo_rm]")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "ppo_rm"]
    assert len(rows) == 2 and "reward/model" in rows[0] and "reward/coherent" not in rows[0]
    assert checkpoint_info(out / "checkpoints" / "ppo_rm")["complete"]


def test_eval_table_and_report(sft_run, tmp_path):
    out = rl_run(sft_run, tmp_path, [], stages="[pretrain,sft,srppo,eval]")
    results = json.loads((out / "eval.json").read_text())
    assert list(results) == ["pretrain", "sft", "srppo"]
    for rows in results.values():
        assert set(rows) == {"eval_id", "eval_ood"}
        for row in rows.values():
            assert 0.0 <= row["accuracy"] <= 1.0 and row["loglik"] < 0 and 0 <= row["careful_rate"] <= 1
    table = (out / "eval.md").read_text()
    assert "| PT |" in table and "| SFT |" in table and "| SRPPO |" in table
    assert main(["report", str(out)]) == 0
    pngs = sorted(p.name for p in (out / "report").iterdir())
    assert pngs == ["index.html", "pretrain.png", "sft.png", "srppo.png"]
    assert all((out / "report" / p).stat().st_size > 10_000 for p in pngs)


CONTRADICTIONS = [
    (["srppo.advantage.estimator=rloo", "srppo.rollout.n_samples=1"], "n_samples >= 2"),
    (["srppo.advantage.estimator=grpo", "srppo.rollout.n_samples=1"], "set n_samples >= 2 or use gae/reinforce"),
    (["srppo.advantage.estimator=rloo", "srppo.critic.warmup_buffers=3"], "rloo has no critic"),
    (["srppo.reward.pretrained=sft"], "the coherent reward log pi_SFT - log pi_PT would be 0"),
    (["srppo.ppo.train_batch_size=999"], "is larger than the rollout buffer"),
    (["srppo.max_steps=3", "srppo.critic.warmup_buffers=3"], "the actor would never train"),
    (["srppo.reward.sft=sftt"], "did you mean 'sft'"),
    (["stages=[pretrain,srppo]"], "srppo.init is 'sft', which does not run before it"),
    (["ppo_rm.reward.model_path=null", "stages=[pretrain,sft,ppo_rm]"], "reward.model_path is not set"),
    (["srppo.ppo.micro_batch_tokens=64"], "is smaller than max_prompt_len + rollout.max_new_tokens"),
    (["srppo.kl.estimator=k5"], "'k5' is not allowed"),
]


@pytest.mark.parametrize("overrides,needle", CONTRADICTIONS)
def test_contradicting_rl_options(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(QUICKSTART, [f"output_dir={tmp_path}", *overrides])


def test_paper_configs_validate():
    for path in ("configs/paper_llama3_8b.yaml", "configs/paper_mistral_7b.yaml"):
        cfg = load_config(path)
        assert cfg.stages == ["sft", "sft_extended", "srppo", "eval"]
        assert cfg.srppo.prompts_per_step == 1024 and cfg.srppo.ppo.train_batch_size == 128
        assert cfg.srppo.critic.warmup_buffers == 35 and cfg.srppo.critic.optim.lr == 9e-6
        assert cfg.sft.batch_size == 128 and cfg.sft.epochs == 2 and cfg.sft_extended.epochs == 6
        assert cfg.srppo.kl.coef in (0.2, 0.5) and cfg.srppo.ppo.clip_eps == 0.2
        assert main(["train", "--config", path, "--dry-run"]) == 0


# ------------------------------------------------------------------------------------------------
# resume: a run killed mid-way and resumed ends where an uninterrupted one does


@pytest.mark.parametrize("stage,sig", [("srppo", signal.SIGTERM), ("pretrain", signal.SIGINT)])
def test_killed_run_resumes_to_the_same_result(sft_run, tmp_path, stage, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    steps = ["srppo.max_steps=6", "srppo.save_every=0"]
    if stage == "pretrain":  # (the srppo case starts from the fixture's finished 6-step pretraining)
        steps += ["pretrain.max_steps=12", "pretrain.save_every=0"]
    stages = "stages=[pretrain,sft,srppo]"
    runs = {}
    for kind in ("straight", "killed"):
        out = tmp_path / kind
        if stage == "srppo":
            shutil.copytree(sft_run, out)
        args = train_command(out, [*TINY_RL, *steps, stages])
        if kind == "straight":
            done = subprocess.run(args, env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
        else:
            proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            kill_when(proc, out / "metrics.jsonl", stage, 2, sig)
            err = proc.communicate(timeout=300)[1]
            assert proc.returncode == 130, err
            assert f"{stage} stopped by {signal.Signals(sig).name} after step" in err
            info = checkpoint_info(out / "checkpoints" / stage)
            assert info["complete"] is False and 2 <= info["step"] < (6 if stage == "srppo" else 12)
            done = subprocess.run(args, env=env, capture_output=True, text=True)  # the same command resumes
            assert done.returncode == 0, done.stderr[-2000:]
            assert f"resuming {stage} from step {info['step']}" in done.stderr
        runs[kind] = out
    assert step_rows(runs["killed"] / "metrics.jsonl", stage) == step_rows(runs["straight"] / "metrics.jsonl", stage)
    a, b = (load_weights(runs[kind] / "checkpoints" / "srppo") for kind in ("killed", "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_config(sft_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(sft_run, out)
    proc = subprocess.Popen(train_command(out, [*TINY_RL, "srppo.max_steps=6", "stages=[pretrain,sft,srppo]"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when(proc, out / "metrics.jsonl", "srppo", 1, signal.SIGTERM)
    assert proc.wait(timeout=300) == 130
    cfg = load_config(QUICKSTART, [*tiny_run_overrides(out), *TINY_RL, "srppo.max_steps=6",
                                   "stages=[pretrain,sft,srppo]", "srppo.kl.coef=0.7"])
    from srppo_fast.errors import CheckpointError

    with pytest.raises(CheckpointError, match="unfinished run of a different config"):
        run(cfg)


def test_rl_schedules_count_optimizer_steps(sft_run, tmp_path, monkeypatch):
    """2 buffers x 2 PPO epochs x (8 responses / 4 per minibatch) = 8 optimizer steps: a linear decay must
    reach its floor at the 8th (the last), not at the 2nd, and warm-up spans its share of the 8; the actor
    sits out the critic's warm-up buffer, so its schedule spans the 4 steps it takes."""
    from srppo_fast.engine import TorchEngine

    seen: dict[int, list[float]] = {}
    step = TorchEngine.step

    def recording_step(self, *args, **kwargs):
        stats = step(self, *args, **kwargs)
        seen.setdefault(id(self), []).append(stats["lr"])
        return stats

    monkeypatch.setattr(TorchEngine, "step", recording_step)
    lr = 1e-3
    out = rl_run(sft_run, tmp_path, ["srppo.ppo.epochs=2", "srppo.optim.schedule=linear",
                                     "srppo.optim.min_lr_ratio=0.1", "srppo.optim.warmup_ratio=0.25",
                                     "srppo.critic.optim.schedule=linear", "srppo.critic.optim.min_lr_ratio=0.2",
                                     "srppo.critic.warmup_buffers=1", "srppo.max_steps=3"])
    actor, critic = sorted(seen.values(), key=len)  # the actor trains on buffers 2-3, the critic on 1-3
    assert len(critic) == 12 and len(actor) == 8
    # actor: 8 steps, warm-up round(0.25 * 8) = 2 steps, then linear from lr to 0.1 lr at the last step
    assert actor[:3] == pytest.approx([lr / 3, 2 * lr / 3, lr])
    assert actor[4] == pytest.approx(lr * (1 - 0.9 * 2 / 5)) and actor[-1] == pytest.approx(0.1 * lr)
    assert critic[-1] == pytest.approx(0.2 * lr) and critic[0] == pytest.approx(lr)
    assert all(a >= b for a, b in zip(actor[2:], actor[3:]))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "srppo"]
    assert rows[-1]["actor_lr"] == pytest.approx(sum(actor[-4:]) / 4)  # the logged lr is the buffer's mean


def test_profile_breaks_an_rl_stage_down_and_traces_it(sft_run, tmp_path, capsys):
    """`srppo-fast profile` on a run whose SFT is trained: N steps of srppo into OUTPUT_DIR/profile (the run's
    own checkpoints untouched), a row per step with every phase, a steady-state summary and a trace."""
    out = tmp_path / "run"
    shutil.copytree(sft_run, out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    trace = tmp_path / "trace"
    assert main(["profile", "--config", QUICKSTART, "--steps", "3", "--trace", str(trace), *tiny_run_overrides(out),
                 *TINY_RL, "srppo.critic.warmup_buffers=1"]) == 0
    text = capsys.readouterr().out
    assert "srppo: 3 steps" in text
    header = next(line for line in text.splitlines() if "generate" in line and "update" in line)
    assert header.split() == ["step", "generate", "sync", "score", "adv", "update", "total", "s", "samples/s",
                              "tokens/s", "hidden"]
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    for r in rows:  # the phases add up to the step's total
        assert abs(sum(map(float, r[1:6])) - float(r[6])) < 0.01, r
    assert "median over steps 2-3" in text
    assert (trace / "trace_rank0.json").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing of the run's changed
    rows = [r for r in read_metrics(out / "profile" / "metrics.jsonl") if r["stage"] == "srppo" and "time/step" in r]
    assert [r["actor_trained"] for r in rows] == [0.0, 1.0, 1.0]  # an explicit warm-up override is kept
    with pytest.raises(SystemExit):
        main(["profile"])
    assert main(["profile", "--config", QUICKSTART, "--steps", "0", *tiny_run_overrides(out)]) == 2
    assert "at least 1 step" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert main(["profile", "--config", QUICKSTART, *tiny_run_overrides(fresh)]) == 2
    err = capsys.readouterr().err
    assert "srppo.init='sft'" in err and "train it first" in err and not fresh.exists()
