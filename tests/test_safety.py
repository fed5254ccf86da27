"""Check before writing, the data and tokenizers a stage depends on, and training that never saves garbage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from srppo_fast.cli import main
from srppo_fast.config_load import load_config
from srppo_fast.errors import CheckpointError, ConfigError, DataError, TrainingError
from srppo_fast.metrics import read_metrics
from srppo_fast.modeling import checkpoint_info
from srppo_fast.runner import run

from .helpers import QUICKSTART, TINY_ARCH, TINY_WORLD

BASE = ["runtime.progress=false", "logging.backends=[jsonl]", "runtime.num_threads=1",
        *[f"world.{k}={v}" for k, v in TINY_WORLD.items()], *[f"model.arch.{k}={v}" for k, v in TINY_ARCH.items()]]
SFT = ["stages=[sft]", "sft.init=base", "sft.max_steps=2", "sft.batch_size=4"]


def cfg_for(out: Path, *extra: str):
    return load_config(QUICKSTART, [f"output_dir={out}", *BASE, *SFT, *extra])


def snapshot(root: Path) -> dict:
    """Every file and directory under root with its bytes: a refused run must change none of it."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run(cfg_for(out))
    return out


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory) -> Path:
    """A run SIGKILLed right after its first save (step 1 of 3): an unfinished checkpoint."""
    out = tmp_path_factory.mktemp("unfinished") / "run"
    args = [sys.executable, "-m", "tests.faulty", "train", "--config", QUICKSTART, f"output_dir={out}", *BASE, *SFT,
            "sft.max_steps=3", "sft.save_every=1"]
    trace = out.parent / "trace.txt"
    probe = subprocess.run(args, capture_output=True, text=True,
                           env={**os.environ, "SRPPO_FAST_TEST_FS_TRACE": str(trace)})
    assert probe.returncode == 0, probe.stderr[-2000:]
    first_save_done = next(int(n) for n, label in (line.split(" ", 1) for line in trace.read_text().splitlines())
                           if label == "saved sft")
    shutil.rmtree(out)
    killed = subprocess.run(args, capture_output=True, text=True,
                            env={**os.environ, "SRPPO_FAST_TEST_KILL_AT": str(first_save_done + 1)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    info = checkpoint_info(out / "checkpoints" / "sft")
    assert info["complete"] is False and info["step"] == 1
    return out


# ------------------------------------------------------------------------------------------------
# 2. check everything before writing anything


@pytest.mark.parametrize("which", ["finished", "unfinished"])
def test_a_refused_run_leaves_output_dir_byte_identical_and_names_the_keys(request, tmp_path, which):
    out = tmp_path / "run"
    shutil.copytree(request.getfixturevalue(which), out)
    before = snapshot(out)
    changed = cfg_for(out, "sft.optim.lr=5e-4", "world.careful_fraction=0.5",
                      *(["sft.max_steps=3", "sft.save_every=1"] if which == "unfinished" else []))
    with pytest.raises(CheckpointError) as info:
        run(changed)
    message = str(info.value)
    word = "a finished run" if which == "finished" else "an unfinished run"
    assert f"holds {word} of a different config (changed: config keys sft.optim.lr, world.careful_fraction)" in message
    assert snapshot(out) == before  # config.yaml, world/ (whose config changed) and metrics untouched


def test_the_same_config_resumes_an_unfinished_stage(unfinished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(unfinished, out)
    ctx = run(cfg_for(out, "sft.max_steps=3", "sft.save_every=1"))
    assert "resuming sft from step 1" in (ctx.out / "train.log").read_text()
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]  # step 1 once: the killed run's row, none twice


def test_a_config_yaml_the_tool_did_not_write_is_never_overwritten(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("stages: [sft]\n")  # the user's own config, in the output_dir
    with pytest.raises(ConfigError, match="holds a config.yaml that srppo-fast did not write"):
        run(cfg_for(out))
    assert (out / "config.yaml").read_text() == "stages: [sft]\n" and os.listdir(out) == ["config.yaml"]


def test_output_dir_problems(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="output_dir '.*file' is a file"):
        run(cfg_for(tmp_path / "file"))
    (tmp_path / "o" / "checkpoints" / "sft").mkdir(parents=True)  # something that is not our checkpoint
    (tmp_path / "o" / "checkpoints" / "sft" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not an srppo-fast checkpoint"):
        run(cfg_for(tmp_path / "o"))
    (tmp_path / "w" / "world").mkdir(parents=True)
    (tmp_path / "w" / "world" / "data.jsonl").write_text("{}")
    with pytest.raises(ConfigError, match="world exists but is not an embedded world"):
        run(cfg_for(tmp_path / "w"))
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="is not writable"):
            run(cfg_for(tmp_path / "ro" / "run"))


def test_world_command_refuses_a_directory_that_holds_something_else(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "thesis.tex").write_text("years of work")
    assert main(["world", "--out", str(tmp_path / "d"), "world.num_corpus_docs=50"]) == 2
    assert "holds no world srppo-fast wrote" in capsys.readouterr().err
    assert os.listdir(tmp_path / "d") == ["thesis.tex"]
    assert main(["world", "--out", str(tmp_path / "w"), *[f"world.{k}={v}" for k, v in TINY_WORLD.items()]]) == 0
    assert main(["world", "--out", str(tmp_path / "w"), "world.seed=1",  # our own world: rewritten
                 *[f"world.{k}={v}" for k, v in TINY_WORLD.items() if k != "seed"]]) == 0
    assert json.loads((tmp_path / "w" / "world.json").read_text())["build"]["config"]["seed"] == 1


def test_a_changed_data_file_redoes_nothing_silently(tmp_path, world_dir):
    data = tmp_path / "demos.jsonl"
    shutil.copy(os.path.join(world_dir, "demos.jsonl"), data)
    out = tmp_path / "run"
    run(cfg_for(out, f"sft.data={data}"))
    run(cfg_for(out, f"sft.data={data}"))  # unchanged: skipped
    assert "already complete" in (out / "train.log").read_text()
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")  # one demonstration fewer, same path
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=f"the data file '{data}' \\(its contents changed since\\)"):
        run(cfg_for(out, f"sft.data={data}"))
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------------
# --dry-run checks what it can without training


DRY = [
    (["model.base=/no/such/model", "model.tokenizer=auto", "sft.init=base"],
     "model.base: '/no/such/model' does not exist"),
    (["model.arch.hidden_sise=64"], "model.arch.hidden_sise is not a field of LlamaConfig"),
    (["sft.data={bad}"], "{bad}:2: not valid JSON"),
    (["sft.data={text_only}"], "a 'text' record has no prompt"),
    (["output_dir={file}"], "is a file"),
    (["stages=[sft,eval]", "eval.models=[sft,{notamodel}]"], "is not a Hugging Face model directory"),
    (["model.arch.hidden_size=30"], "model.arch is not a valid LlamaConfig"),
    (["model.arch.num_key_value_heads=2", "model.arch.num_attention_heads=3", "model.arch.hidden_size=96"],
     "model.arch.num_key_value_heads (2) must divide num_attention_heads (3)"),
    (["world.num_eval=5000"], "is more than half of the 8100 addition problems"),
    (["world.vocab_size=64"], "world.vocab_size: 64 is out of range; it must be at least 260"),
]


@pytest.mark.parametrize("overrides,needle", DRY, ids=[d[1][:30] for d in DRY])
def test_dry_run_checks_paths_data_and_arch(tmp_path, capsys, overrides, needle):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    (tmp_path / "text_only.jsonl").write_text('{"text": "raw"}\n')
    (tmp_path / "file").write_text("")
    (tmp_path / "notamodel").mkdir()
    paths = {k: str(tmp_path / v) for k, v in (("bad", "bad.jsonl"), ("text_only", "text_only.jsonl"),
                                              ("file", "file"), ("notamodel", "notamodel"))}
    overrides = [o.format(**paths) for o in overrides]
    args = ["train", "--config", QUICKSTART, "--dry-run", f"output_dir={tmp_path / 'out'}", *BASE, *SFT, *overrides]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("srppo-fast: error:") and err.count("\n") == 1 and needle.format(**paths) in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks what a machine without CUDA says")
def test_a_gpu_config_dry_runs_anywhere_and_a_real_run_stops_before_writing(tmp_path, capsys):
    args = ["train", "--config", QUICKSTART, f"output_dir={tmp_path / 'out'}", *BASE, *SFT,
            "model.attn_implementation=flash_attention_2"]
    assert main([*args, "--dry-run"]) == 0
    assert "NOT ON THIS MACHINE: model.attn_implementation is 'flash_attention_2', which runs on CUDA only" in \
        capsys.readouterr().out
    assert main(args) == 2
    assert "which runs on CUDA only" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_dry_run_lists_what_it_checked(tmp_path, capsys, world_dir):
    data = tmp_path / "demos.jsonl"
    shutil.copy(os.path.join(world_dir, "demos.jsonl"), data)
    assert main(["train", "--config", QUICKSTART, "--dry-run", f"output_dir={tmp_path / 'out'}", *BASE, *SFT,
                 f"sft.data={data}"]) == 0
    out = capsys.readouterr().out
    assert "checks:" in out and f"'{data}': all " in out and "records parse and hold what the stage needs" in out
    assert "every key is a field of the llama config" in out
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# 4. models that must agree


def _with_tokenizer(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    edit(tok)
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


def test_models_with_another_tokenizer_are_refused(finished, tmp_path):
    sft = finished / "checkpoints" / "sft"

    def swap_digits(tok):  # same size, two ids exchanged: scores would be meaningless
        vocab = tok["model"]["vocab"]
        vocab["1"], vocab["2"] = vocab["2"], vocab["1"]

    permuted = _with_tokenizer(sft, tmp_path / "permuted", swap_digits)
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    with pytest.raises(ConfigError) as info:
        run(cfg_for(out, "stages=[sft,eval]", f"eval.models=[sft,{permuted}]"))
    message = str(info.value)
    assert f"eval.models[1] ({permuted})" in message and "different token -> id assignments" in message
    assert "world/tokenizer" in message  # the run's tokenizer is named too

    from transformers import AutoConfig

    small = tmp_path / "small"
    shutil.copytree(sft, small)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (small / f).unlink()
    config = AutoConfig.from_pretrained(small)
    config.vocab_size -= 10  # a model whose embedding does not cover every id of the run's tokenizer
    config.save_pretrained(small)
    with pytest.raises(ConfigError, match=r"has a vocabulary of \d+ ids but the run's tokenizer .* has \d+"):
        run(cfg_for(out, "stages=[sft,eval]", f"eval.models=[{small}]"))


def test_rl_stages_check_every_model_they_read():
    from srppo_fast.stages.rl import stage_models

    cfg = load_config(QUICKSTART)
    assert stage_models(cfg.srppo, "srppo") == {"srppo.init": "sft", "srppo.kl.reference": "sft",
                                                 "srppo.reward.sft": "sft", "srppo.reward.pretrained": "pretrain",
                                                 "srppo.critic.init": "sft"}
    cfg = load_config(QUICKSTART, ["ppo_rm.reward.model_path=rm/", "ppo_rm.advantage.estimator=rloo",
                                   "ppo_rm.rollout.n_samples=2"])
    assert stage_models(cfg.ppo_rm, "ppo_rm") == {"ppo_rm.init": "sft", "ppo_rm.kl.reference": "sft",
                                                   "ppo_rm.reward.model_path": "rm/"}


# ------------------------------------------------------------------------------------------------
# 5. training never saves garbage


def test_divergence_stops_the_run_and_never_saves_non_finite_weights(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        run(cfg_for(out, "sft.max_steps=12", "sft.save_every=1", "sft.optim.lr=1e30", "sft.optim.warmup_ratio=0",
                    "sft.optim.grad_clip=0", "runtime.max_nonfinite_steps=3"))
    message = str(info.value)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    skipped = [r["step"] for r in rows if r["skipped"] == 1.0]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))  # three in a row, then stop
    assert rows[-1]["nonfinite_steps"] == 3 and rows[-1]["step"] == skipped[-1]
    assert ("3 optimizer steps in a row had a non-finite loss or gradient norm "
            f"(the last at step {skipped[-1]}") in message
    info = checkpoint_info(out / "checkpoints" / "sft")
    assert info["complete"] is False and f"(step {info['step']})" in message and "peak 1e+30" in message
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoints" / "sft" / "model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_a_stage_whose_every_step_was_non_finite_has_not_trained(tmp_path):
    """A broken model (rope_theta < 0: NaN everywhere) over fewer steps than the stop rule's limit must not end
    in "done" with weights that were never updated."""
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"sft: 1 optimizer steps in a row had a non-finite loss"):
        run(cfg_for(out, "sft.max_steps=1", "model.arch.rope_theta=-1"))
    assert checkpoint_info(out / "checkpoints" / "sft") is None


def test_a_model_with_non_finite_weights_is_never_saved(tiny_model, tokenizer, tmp_path):
    import torch

    from srppo_fast.modeling import save_checkpoint

    with torch.no_grad():
        next(tiny_model.parameters())[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="weights are not finite"):
        save_checkpoint(tmp_path / "ckpt", tiny_model, tokenizer, {"stage": "x"})
    assert not (tmp_path / "ckpt").exists() and os.listdir(tmp_path) == []


def test_every_prompt_dropped_is_a_clear_error(tokenizer, world_dir):
    from srppo_fast.rl.run import load_prompts

    with pytest.raises(DataError, match=r"srppo.prompts: all 40 prompts of 'world:prompts' are longer than "
                                        r"max_prompt_len=2"):
        load_prompts("world:prompts", tokenizer, world_dir, 2, "srppo.prompts")
