"""End to end on a tiny world: pretrain + SFT through the CLI, checkpoints, skip/refuse on rerun."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from srppo_fast.cli import main
from srppo_fast.config import ModelConfig
from srppo_fast.config_load import load_config
from srppo_fast.errors import CheckpointError
from srppo_fast.metrics import read_metrics
from srppo_fast.modeling import checkpoint_info, load_model, save_checkpoint
from srppo_fast.runner import run

from .helpers import QUICKSTART, tiny_run_overrides


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--config", QUICKSTART, *tiny_run_overrides(out), "stages=[pretrain,sft]"]) == 0
    return out


def test_pretrain_then_sft_smoke(tiny_run):
    rows = read_metrics(tiny_run / "metrics.jsonl")
    pretrain = [r for r in rows if r["stage"] == "pretrain" and "loss" in r]
    sft_steps = [r for r in rows if r["stage"] == "sft" and "loss" in r]
    assert [r["step"] for r in pretrain] == list(range(1, 7))
    assert len(sft_steps) == 4  # 2 epochs x 8 demos / batch 4
    for r in pretrain + sft_steps:
        assert {"loss", "lr", "tokens_per_s", "pad_fraction", "grad_norm", "microbatches"} <= set(r)
        assert r["loss"] > 0 and r["tokens_per_s"] > 0
    assert pretrain[-1]["loss"] < pretrain[0]["loss"]
    evals = [r["eval_loss"] for r in rows if r["stage"] == "sft" and "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]  # held-out demonstrations: SFT helps
    resolved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert resolved["output_dir"] == str(tiny_run) and resolved["pretrain"]["max_steps"] == 6
    for stage in ("pretrain", "sft"):
        info = checkpoint_info(tiny_run / "checkpoints" / stage)
        assert info["complete"] and info["stage"] == stage
    # six steps teach no arithmetic: the careful-skill probe measures that and says so
    skill = [r for r in rows if r["stage"] == "pretrain" and "careful_skill/eval_id" in r]
    assert len(skill) == 1 and skill[0]["careful_skill/eval_id"] < 0.2 and skill[0]["careful_skill/eval_ood"] < 0.2
    assert checkpoint_info(tiny_run / "checkpoints" / "pretrain")["careful_skill"]["eval_id"] == \
        skill[0]["careful_skill/eval_id"]
    assert "has not fully learnt the careful skill" in (tiny_run / "train.log").read_text()


def test_checkpoint_is_a_plain_hf_directory(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_run / "checkpoints" / "sft"
    model = AutoModelForCausalLM.from_pretrained(path)  # no srppo-fast involved
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and tok.eos_token == "<eos>"
    ids = torch.tensor([tok("<bos>Q: 12+30\nA: ", add_special_tokens=False)["input_ids"]])
    # round trip through our save: identical logits
    save_checkpoint(tmp_path / "copy", model, tok, {"stage": "copy"})
    again = load_model(str(tmp_path / "copy"), ModelConfig(attn_implementation="sdpa"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits, atol=0, rtol=0)
    assert json.loads((tmp_path / "copy" / "srppo_checkpoint.json").read_text()) == {"stage": "copy"}


def test_rerun_skips_finished_stages_and_refuses_a_changed_config(tiny_run, caplog):
    cfg = load_config(QUICKSTART, tiny_run_overrides(tiny_run) + ["stages=[pretrain,sft]"])
    before = (tiny_run / "checkpoints" / "sft" / "model.safetensors").stat().st_mtime_ns
    run(cfg)
    assert (tiny_run / "checkpoints" / "sft" / "model.safetensors").stat().st_mtime_ns == before
    changed = load_config(QUICKSTART, tiny_run_overrides(tiny_run) + ["stages=[pretrain,sft]", "sft.optim.lr=5e-4"])
    with pytest.raises(CheckpointError, match=r"holds a finished run of a different config \(changed: config keys "
                                               r"sft.optim.lr\)"):
        run(changed)
