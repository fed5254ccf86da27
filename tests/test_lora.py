"""LoRA adapters as the model roles (model.lora): one frozen base serves pi_PT (adapters off), pi_SFT (the SFT
adapter), the actor and the critic (adapters of their own). Real peft adapters on a tiny Llama trained here:
the roles against the models they stand for, one base in memory (parameter storage counted), only adapters and
the value head train, checkpoints in peft's format that resume bit for bit, DeepSpeed in two processes, merged
export, bad inputs."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import QUICKSTART, require, step_rows, tiny_run_overrides, trainer_logprobs

require("peft")

from srppo_fast.adapters import linear_names, merge_adapter_into, resolve_targets  # noqa: E402
from srppo_fast.cli import main  # noqa: E402
from srppo_fast.config import ModelConfig  # noqa: E402
from srppo_fast.lora import SharedBase, peft_config  # noqa: E402

LORA = ["model.lora.rank=4", "model.lora.alpha=8"]
RL = ["srppo.prompts_per_step=4", "srppo.rollout.n_samples=2", "srppo.ppo.train_batch_size=4",
      "srppo.rollout.max_new_tokens=12", "srppo.max_prompt_len=32", "srppo.ppo.micro_batch_tokens=256",
      "srppo.critic.warmup_buffers=1", "srppo.max_steps=3", "srppo.eval_every=0", "srppo.optim.lr=1e-3",
      "srppo.critic.optim.lr=1e-3", "srppo.reward.no_eos=keep", "runtime.device=cpu", "runtime.precision=fp32"]


def _train(out: Path, extra: list[str], env: dict | None = None, faulty: bool = False) -> subprocess.CompletedProcess:
    args = ["-m", "tests.faulty" if faulty else "srppo_fast", "train", "--config", QUICKSTART,
            *tiny_run_overrides(out), *extra]
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The tiny world and a pretrained base (full weights: it starts from scratch), for the LoRA runs to copy."""
    out = tmp_path_factory.mktemp("lora") / "run"
    proc = _train(out, ["stages=[pretrain]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# the roles on one base against the models they stand for


def _roles(tiny_model):
    base = copy.deepcopy(tiny_model)
    shared = SharedBase(base, "tiny")
    config = peft_config(4, 8.0, 0.0, resolve_targets(linear_names(base), ["all-linear"]))
    shared.add("sft", config, seed=1, dtype=torch.float32)
    with torch.no_grad():
        for _, p in shared.params("sft"):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    sft_state = {k: p.detach().clone() for k, p in shared.params("sft")}
    shared.add("actor", config, seed=2, dtype=torch.float32, state=sft_state)
    shared.add("critic", config, seed=3, dtype=torch.float32)
    for name in ("actor", "critic"):
        for _, p in shared.params(name):
            p.requires_grad_(True)
    return shared


def _sequences(tokenizer):
    prompts = [tokenizer.encode("12+7=")[:8], tokenizer.encode("Q: 3-1?")[:8]]
    responses = [tokenizer.encode(" 19 so")[:6], tokenizer.encode(" two")[:6]]
    return prompts, responses


def test_each_role_is_the_model_it_stands_for(tiny_model, tokenizer, tmp_path):
    from peft import PeftModel

    shared = _roles(tiny_model)
    pt, sft, actor = shared.view(None), shared.view("sft"), shared.view("actor")
    prompts, responses = _sequences(tokenizer)
    with torch.no_grad():
        base_logp = trainer_logprobs(tiny_model, prompts, responses)
        assert torch.equal(trainer_logprobs(pt, prompts, responses), base_logp)  # adapters off = the base, bitwise
        sft_logp = trainer_logprobs(sft, prompts, responses)
        assert torch.equal(trainer_logprobs(actor, prompts, responses), sft_logp)  # the actor starts as pi_SFT
        assert (sft_logp - base_logp).abs().max() > 1e-3  # the adapter does something
        merged = merge_adapter_into(copy.deepcopy(tiny_model), _save(sft, tmp_path / "sft"))
        assert (trainer_logprobs(merged, prompts, responses) - sft_logp).abs().max() < 1e-5
        peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(tmp_path / "sft")).eval()
        ids = torch.tensor([prompts[0] + responses[0]])
        assert (peft_model(input_ids=ids).logits - sft(input_ids=ids).logits).abs().max() < 1e-5  # peft reads ours
    # an update of the actor's adapter moves the actor, never the base or pi_SFT
    actor.train()
    loss = actor(input_ids=torch.tensor([prompts[0] + responses[0]])).logits.logsumexp(-1).sum()
    loss.backward()
    with torch.no_grad():
        for p in actor.parameters():
            p -= 0.1 * p.grad
        assert torch.equal(trainer_logprobs(pt, prompts, responses), base_logp)
        assert torch.equal(trainer_logprobs(sft, prompts, responses), sft_logp)
        assert (trainer_logprobs(actor, prompts, responses) - sft_logp).abs().max() > 1e-4


def _save(view, path: Path) -> str:
    view.save_pretrained(str(path))
    return str(path)


def test_a_view_owns_only_its_adapter_and_head(tiny_model):
    from srppo_fast.lora import value_head

    shared = _roles(tiny_model)
    actor, critic = shared.view("actor"), shared.view("critic", value_head(tiny_model.config.hidden_size))
    actor_ids = {id(p) for _, p in shared.params("actor")}
    assert {id(p) for p in actor.parameters()} == actor_ids
    assert {id(p) for p in critic.parameters()} == {id(p) for _, p in shared.params("critic")} | {
        id(critic.score.weight)}
    # switching roles never changes what trains
    flags = {n: p.requires_grad for n, p in shared.model.named_parameters()}
    for view in (shared.view("sft"), shared.view(None), actor, critic):
        view.enter()
    assert {n: p.requires_grad for n, p in shared.model.named_parameters()} == flags
    assert sum(flags.values()) == len(shared.params("actor")) + len(shared.params("critic"))


def test_gradient_checkpointing_recomputes_each_role_under_its_own_adapter(tiny_model):
    """The actor's and the critic's forwards share one autograd pass (the fused PPO op): a checkpointed block is
    recomputed in the backward under the adapter its forward ran with, not under whichever is active then."""
    from srppo_fast.lora import value_head

    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))

    def grads(setup):
        shared = _roles(tiny_model)
        actor = shared.view("actor")
        critic = shared.view("critic", value_head(tiny_model.config.hidden_size))
        with torch.no_grad():
            critic.score.weight.normal_(generator=torch.Generator().manual_seed(1))
        for v in (actor, critic):
            v.train()
        setup(shared)
        loss_a = actor(input_ids=ids).logits.logsumexp(-1).sum()
        loss_c = critic(input_ids=ids).logits.pow(2).sum()
        torch.autograd.backward([loss_a, loss_c])
        return torch.cat([p.grad.flatten() for p in [*actor.parameters(), *critic.parameters()]])

    plain = grads(lambda shared: None)
    ours = grads(lambda shared: shared.enable_gradient_checkpointing())
    assert torch.allclose(ours, plain, atol=1e-6, rtol=1e-5)
    # without the checkpoint context, the actor's blocks would be recomputed under the critic's adapter
    naive = grads(lambda shared: shared.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}))
    assert (naive - plain).abs().max() > 1e-4


def test_the_fused_logprob_op_runs_through_the_adapters(tiny_model, tokenizer, tmp_path):
    from srppo_fast.experience import lm_head

    shared = _roles(tiny_model)
    sft = shared.view("sft")
    assert lm_head(sft) is not None  # the fused lm_head + log-softmax path, no [N, V] logits
    prompts, responses = _sequences(tokenizer)
    merged = merge_adapter_into(copy.deepcopy(tiny_model), _save(sft, tmp_path / "a"))
    with torch.no_grad():
        packed = trainer_logprobs(sft, prompts, responses)  # both sequences in one packed row
        for i in range(2):
            one = trainer_logprobs(merged, prompts[i:i + 1], responses[i:i + 1])[0]
            assert (packed[i, :len(responses[i])] - one[:len(responses[i])]).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# runs


def test_srppo_with_lora_holds_one_base_and_trains_only_adapters(pretrained, tmp_path, monkeypatch):
    """pretrain -> SFT (an adapter) -> SRPPO (actor and critic adapters; pi_SFT, pi_PT and the KL reference on the
    same module), in this process: the stage's models are counted by their parameters' storage."""
    from srppo_fast.modeling import load_model
    from srppo_fast.rl.models import RLModels

    out = _copy(pretrained, tmp_path / "run")
    seen = {}
    close = RLModels.close

    def inspect(self):
        models = {"actor": self.actor.model, "critic": self.critic.model, "sft": self.sft, "pt": self.pt,
                  "ref": self.ref}
        storages = {}
        for m in models.values():
            for p in [*m.shared.model.parameters(), *m.parameters()]:
                storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        base = models["pt"].shared
        seen.update(storage=sum(storages.values()), base_numel=base.base_numel(),
                    adapters=sum(p.numel() for n in base.configs for _, p in base.params(n)),
                    head=self.critic.model.score.weight.numel(), same=len({id(m.shared) for m in models.values()}),
                    base_state={k: v.clone() for k, v in base.model.state_dict().items() if ".lora_" not in k},
                    sft_state={k: p.detach().clone() for k, p in base.params("a_sft")})
        close(self)

    monkeypatch.setattr(RLModels, "close", inspect)
    assert main(["train", "--config", QUICKSTART, *tiny_run_overrides(out), *RL, *LORA,
                 "stages=[pretrain,sft,srppo]"]) == 0
    assert seen["same"] == 1  # the five roles: one SharedBase
    assert seen["storage"] == 4 * (seen["base_numel"] + seen["adapters"] + seen["head"])  # fp32, nothing else
    # the base is the pretrained checkpoint bit for bit, pi_SFT's adapter the SFT stage's
    pretrain = load_model(str(out / "checkpoints/pretrain"), ModelConfig())
    plain = {k.replace(".base_layer.", "."): v for k, v in seen["base_state"].items()}
    assert all(torch.equal(plain[k], v) for k, v in pretrain.state_dict().items() if k in plain)
    assert set(plain) >= {k for k in pretrain.state_dict() if k != "lm_head.weight"}
    sft = _adapter(out / "checkpoints/sft")
    assert all(torch.equal(seen["sft_state"][k], sft[k]) for k in sft)
    # the actor's and the critic's adapters trained; the checkpoints are adapters, not models
    ckpt = out / "checkpoints/srppo"
    actor, critic = _adapter(ckpt), _adapter(ckpt / "critic")
    assert any(not torch.equal(actor[k], sft[k]) for k in sft)
    assert any(not torch.equal(critic[k], sft[k]) for k in sft)  # the critic started from the SFT adapter
    assert (ckpt / "critic/value_head.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists() and not (out / "checkpoints/sft/model.safetensors").exists()


def test_bf16_keeps_the_base_and_the_adapters_in_bf16_and_fp32_masters(tmp_path, monkeypatch):
    """runtime.precision=bf16 (autocast on the CPU): the shared base and every adapter the forwards read are bf16,
    the trainable adapters' masters fp32 (what the optimizer steps and the checkpoint saves)."""
    from safetensors.torch import load_file

    from srppo_fast.rl.models import RLModels

    out = tmp_path / "run"  # its own pretraining: a finished stage is not re-run under another precision
    seen = {}
    close = RLModels.close

    def inspect(self):
        base = self.pt.shared
        seen["base"] = {p.dtype for n, p in base.model.named_parameters() if ".lora_" not in n}
        seen["adapters"] = {p.dtype for name in base.configs for _, p in base.params(name)}
        seen["masters"] = {m.dtype for m in self.actor.masters.values()} | {m.dtype for m in
                                                                              self.critic.masters.values()}
        seen["n_masters"] = len(self.actor.masters) + len(self.critic.masters)
        seen["own"] = len(self.actor.model.own_parameters()) + len(self.critic.model.own_parameters())
        close(self)

    monkeypatch.setattr(RLModels, "close", inspect)
    assert main(["train", "--config", QUICKSTART, *tiny_run_overrides(out), *[a for a in RL if "precision" not in a],
                 *LORA, "runtime.precision=bf16", "stages=[pretrain,sft,srppo]"]) == 0
    assert seen["base"] == {torch.bfloat16} and seen["adapters"] == {torch.bfloat16}
    assert seen["masters"] == {torch.float32} and seen["n_masters"] == seen["own"]
    saved = load_file(out / "checkpoints/srppo/adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # the masters, not their bf16 rounding


def test_a_full_sft_checkpoint_with_a_lora_actor_is_the_base_of_its_adapters(pretrained, tmp_path):
    """Full SFT weights from elsewhere and model.lora: the actor's and the critic's adapters sit on those weights,
    which are also pi_SFT (adapters off); pi_PT, other weights, is a second frozen copy."""
    out = _copy(pretrained, tmp_path / "run")
    full = str(out / "checkpoints/pretrain")  # stands for a full SFT checkpoint of another run
    proc = _train(out, [*RL, *LORA, "stages=[srppo]", f"srppo.init={full}", f"srppo.reward.sft={full}",
                        f"srppo.critic.init={full}", "srppo.reward.pretrained=base", "srppo.max_steps=2",
                        f"model.tokenizer={out / 'world/tokenizer'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    bases = [line.split("shared base ")[1].split(":")[0] for line in proc.stderr.splitlines() if "shared base " in line]
    assert sorted(bases) == sorted([full, "scratch"])
    assert f"LoRA adapter 'actor' on {full}" in proc.stderr and f"LoRA adapter 'critic' on {full}" in proc.stderr
    assert json_base(out / "checkpoints/srppo") == full


def json_base(path: Path) -> str:
    return json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_a_killed_lora_run_resumes_to_the_same_adapters(pretrained, tmp_path):
    runs = {}
    for kind in ("straight", "killed"):
        out = _copy(pretrained, tmp_path / kind)
        args = [*RL, *LORA, "srppo.max_steps=4", "srppo.save_every=0", "stages=[pretrain,sft,srppo]"]
        if kind == "killed":
            proc = _train(out, args, env={"SRPPO_FAST_TEST_SIGTERM_AT": "srppo:2"}, faulty=True)
            assert proc.returncode == 130, proc.stderr[-2000:]
            assert (out / "checkpoints/srppo/trainer_state.pt").is_file()
        proc = _train(out, args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        if kind == "killed":
            assert "resuming srppo from step 2" in proc.stderr
        runs[kind] = out
    assert step_rows(runs["killed"] / "metrics.jsonl", "srppo") == step_rows(runs["straight"] / "metrics.jsonl",
                                                                             "srppo")
    for sub in ("", "critic/"):
        for name in ("adapter_model.safetensors", *(["value_head.safetensors"] if sub else [])):
            a, b = (runs[k] / "checkpoints/srppo" / sub / name for k in ("killed", "straight"))
            assert a.read_bytes() == b.read_bytes(), sub + name


def _saves(trace: Path, stage: str) -> list[list[tuple[int, str]]]:
    saves: list[list[tuple[int, str]]] = []
    for line in trace.read_text().splitlines():
        n, label = line.split(" ", 1)
        if label == f"create .{stage}.tmp":
            saves.append([])
        if saves:
            saves[-1].append((int(n), label))
    return saves


def test_sigkill_during_an_adapter_save(pretrained, tmp_path):
    """The SFT stage's adapter checkpoint (a resumable one after step 2): killed while the adapter is written, after
    it, at the manifest and at the swap (test_crash_safety walks every step of the same save code with full
    weights), the same command resumes from the last complete save and ends with the uninterrupted run's adapter."""
    args = [*LORA, "stages=[pretrain,sft]", "sft.max_steps=3", "sft.save_every=1"]
    ref = _copy(pretrained, tmp_path / "ref")
    trace = tmp_path / "trace.txt"
    assert _train(ref, args, env={"SRPPO_FAST_TEST_FS_TRACE": str(trace)}, faulty=True).returncode == 0
    save = _saves(trace, "sft")[1]
    labels = [label for _, label in save]
    assert labels[1] == "write model"  # the adapter files: written inside the temporary directory, then renamed
    chosen = [(n, label) for n, label in save if label in ("write model", "write tokenizer", "rename .sft.tmp -> sft")
              or label.endswith(".srppo_manifest.json")]
    assert len(chosen) == 4, labels
    for n, label in chosen:
        out = _copy(pretrained, tmp_path / f"k{n}")
        killed = _train(out, args, env={"SRPPO_FAST_TEST_KILL_AT": str(n)}, faulty=True)
        assert killed.returncode == -9, f"not killed at {label}: {killed.stderr[-1000:]}"
        done = _train(out, args)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (out / "checkpoints/sft/adapter_model.safetensors").read_bytes() == \
            (ref / "checkpoints/sft/adapter_model.safetensors").read_bytes(), label
        assert not list((out / "checkpoints").glob(".sft*")), label  # nothing half-written left


@pytest.mark.requires("deepspeed")
def test_deepspeed_zero2_and_zero3_in_two_processes_match_the_torch_engine(pretrained, tmp_path):
    """Adapters and value head after SFT + 3 SRPPO steps: torch engine (one process) against DeepSpeed ZeRO-2 and
    ZeRO-3 in two processes (the base frozen; under ZeRO-3 sharded, the critic's engine sharding its own copy)."""
    # as tests/test_deepspeed.py: Adam's eps keeps rounding-level gradient differences from becoming whole steps
    args = [*RL, *LORA, "stages=[pretrain,sft,srppo]", "srppo.max_steps=2", "srppo.optim.lr=1e-4",
            "srppo.critic.optim.lr=1e-4", *(f"{s}.optim.eps=1e-6" for s in ("sft", "srppo", "srppo.critic"))]
    torch_run = _copy(pretrained, tmp_path / "torch")
    assert _train(torch_run, args).returncode == 0
    want = {sub: _adapter(torch_run / "checkpoints" / sub) for sub in ("sft", "srppo", "srppo/critic")}
    for zero in (2, 3):
        out = _copy(pretrained, tmp_path / f"zero{zero}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "srppo_fast",
               "train", "--config", QUICKSTART, *tiny_run_overrides(out), *args, "runtime.engine=deepspeed",
               f"deepspeed.zero_stage={zero}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        for sub, adapter in want.items():
            got = _adapter(out / "checkpoints" / sub)
            assert got.keys() == adapter.keys()
            worst = max((got[k] - adapter[k]).abs().max().item() for k in adapter)
            assert worst < 1e-5, (zero, sub, worst)


def test_export_merges_an_adapter_into_a_plain_model(pretrained, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from srppo_fast.modeling import load_model

    out = _copy(pretrained, tmp_path / "run")
    assert main(["train", "--config", QUICKSTART, *tiny_run_overrides(out), *LORA, "stages=[pretrain,sft]"]) == 0
    ckpt = out / "checkpoints/sft"
    assert main(["export", str(ckpt), "--out", str(tmp_path / "plain")]) == 2  # an adapter needs --merge
    assert main(["export", str(ckpt), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert main(["export", str(ckpt), "--out", str(tmp_path / "merged"), "--merge"]) == 2  # never over a directory
    assert main(["export", str(out / "checkpoints/pretrain"), "--out", str(tmp_path / "x"), "--merge"]) == 2
    assert not (tmp_path / "plain").exists() and not (tmp_path / "x").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = load_model(str(out / "checkpoints/pretrain"), ModelConfig())
    prompts, responses = _sequences(tokenizer)
    with torch.no_grad():
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base, str(ckpt)).eval()
        ids = torch.tensor([prompts[0] + responses[0]])
        assert (merged(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# what the config says


@pytest.mark.parametrize("overrides,needle", [
    (["model.lora.rank=0"], "model.lora.rank: 0 is out of range"),
    (["model.lora.rank=-2"], "model.lora.rank: -2 is out of range"),
    (["model.lora.target_modules=[q_proj,nope]"], "no linear layer named 'nope'"),
    (["model.lora.target_modules=[]"], "model.lora.target_modules is empty"),
    (["model.lora.target_modules=[all-linear,q_proj]"], "give it alone"),
    (["model.lora.alpha=0"], "model.lora.alpha: 0.0 is out of range"),
    (["model.lora.dropout=1.5"], "model.lora.dropout"),
    (["model.lora.ranks=4"], "unknown config key 'model.lora.ranks'"),
])
def test_bad_lora_settings_are_one_line_before_anything_is_written(tmp_path, overrides, needle):
    out = tmp_path / "run"
    proc = _train(out, [*overrides, "stages=[pretrain,sft]"])
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 or proc.stderr.strip().splitlines()[-1].startswith(
        "srppo-fast: error:")
    assert not out.exists()


def test_an_adapter_whose_base_is_gone_is_refused_before_anything_is_written(pretrained, tmp_path):
    out = _copy(pretrained, tmp_path / "run")
    assert _train(out, [*LORA, "stages=[pretrain,sft]"]).returncode == 0
    moved = tmp_path / "adapter"
    shutil.copytree(out / "checkpoints/sft", moved)
    moved_base = tmp_path / "base-moved"
    shutil.move(out / "checkpoints/pretrain", moved_base)
    fresh = tmp_path / "fresh"
    proc = _train(fresh, [*LORA, "stages=[sft]", f"sft.init={moved}", "model.tokenizer=world"])
    assert proc.returncode == 2 and "does not exist" in proc.stderr and str(moved) in proc.stderr, proc.stderr[-2000:]
    assert not fresh.exists()
    # an adapter for layers its base does not have
    shutil.move(moved_base, out / "checkpoints/pretrain")
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "wq"]}))
    proc = _train(fresh, [*LORA, "stages=[sft]", f"sft.init={moved}", "model.tokenizer=world"])
    assert proc.returncode == 2 and "no linear layer named 'wq'" in proc.stderr, proc.stderr[-2000:]
    assert not fresh.exists()


def test_peft_missing_names_the_extra(monkeypatch):
    import importlib.util

    from srppo_fast import machine
    from srppo_fast.config_load import load_config

    cfg = load_config(QUICKSTART, ["model.lora.rank=8"], check_files=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    found = machine.problems(cfg, {})
    assert any("srppo-fast[lora]" in p for p in found), found


def test_lora_changes_the_fingerprint_of_the_stages_it_changes():
    from srppo_fast.checks import stage_fingerprint
    from srppo_fast.config_load import load_config

    full = load_config(QUICKSTART, check_files=False)
    lora = load_config(QUICKSTART, ["model.lora.rank=8"], check_files=False)
    other = load_config(QUICKSTART, ["model.lora.rank=4"], check_files=False)
    assert stage_fingerprint(full, "pretrain") == stage_fingerprint(lora, "pretrain")  # scratch: full weights
    assert stage_fingerprint(full, "sft") != stage_fingerprint(lora, "sft") != stage_fingerprint(other, "sft")


def test_the_paper_recipe_with_lora_plans_one_gpu():
    from srppo_fast.config_load import load_config
    from srppo_fast.engine.memory import GIB, plan_memory

    cfg = load_config(str(Path(QUICKSTART).parent / "paper_llama3_8b_lora.yaml"), check_files=False)
    plans = {p.name: p for p in plan_memory(cfg, 1, 1, 80.0)}
    srppo = plans["srppo"]
    bases = [m for m in srppo.models if m.role.startswith("frozen base")]
    assert len(bases) == 1 and bases[0].params > 8e9  # pi_PT, pi_SFT, the actor and the critic: one base
    roles = {m.role: m for m in srppo.models}
    assert {"actor adapter", "critic adapter + value head", "frozen adapter sft"} <= set(roles)
    assert 40e6 < roles["actor adapter"].params < 45e6  # rank 16 on the seven projections of Llama-3-8B
    assert srppo.fits and srppo.total_bytes < 40 * GIB
    full = load_config(str(Path(QUICKSTART).parent / "paper_llama3_8b.yaml"), check_files=False)
    full_plan = {p.name: p for p in plan_memory(full, 1, 1, 80.0)}["srppo"]
    assert not full_plan.fits  # four full 8B models do not fit one GPU: that is what LoRA is for
