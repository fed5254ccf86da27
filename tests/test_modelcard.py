"""Every checkpoint directory holds a README.md model card: stages, data fingerprints, evaluation rows and the
command that reproduces it; the eval stage's rewrite of the card keeps the checkpoint complete."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys

import pytest
import yaml

from srppo_fast.checks import preflight, stage_fingerprint
from srppo_fast.cli import main
from srppo_fast.config import to_dict
from srppo_fast.config_load import load_config
from srppo_fast.io import is_complete

from .helpers import QUICKSTART, tiny_run_overrides


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def _yaml_blocks(card: str) -> list:
    return [yaml.safe_load(b) for b in re.findall(r"^```yaml\n(.*?)^```$", card, re.S | re.M)]


@pytest.fixture(scope="module")
def card_run(tmp_path_factory, world_dir):
    """pretrain -> sft (on a data file, so it has a fingerprint) -> eval, started as `srppo-fast train ...`."""
    root = tmp_path_factory.mktemp("cards")
    demos = root / "demos.jsonl"
    shutil.copy(os.path.join(world_dir, "demos.jsonl"), demos)
    out = root / "run"
    overrides = [*tiny_run_overrides(out), "stages=[pretrain,sft,eval]", f"sft.data={demos}",
                 "eval.max_new_tokens=8"]
    args = ["train", "--config", QUICKSTART, *overrides]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["/some/bin/srppo-fast", *args])
        assert main(args) == 0
    return {"out": out, "overrides": overrides, "args": args, "demos": str(demos)}


def test_every_checkpoint_has_a_card(card_run):
    out = card_run["out"]
    for stage in ("pretrain", "sft"):
        card = (out / "checkpoints" / stage / "README.md").read_text(encoding="utf-8")
        front = _front_matter(card)
        assert front["library_name"] == "transformers" and front["tags"] == ["srppo-fast", stage]
        assert "base_model" not in front  # scratch
        assert "complete, after step" in card
        assert is_complete(out / "checkpoints" / stage)


def test_sft_card_names_its_origin_data_eval_and_command(card_run):
    out = card_run["out"]
    cfg = load_config(QUICKSTART, card_run["overrides"])
    card = (out / "checkpoints" / "sft" / "README.md").read_text(encoding="utf-8")
    # base, stages with their config sections
    assert "`scratch`: a randomly initialised `llama`" in card
    assert "1. `pretrain`: causal language model" in card and "2. `sft` (this checkpoint): supervised" in card
    blocks = _yaml_blocks(card)
    assert {"pretrain": to_dict(cfg.pretrain)} in blocks and {"sft": to_dict(cfg.sft)} in blocks
    assert to_dict(cfg.world) in blocks  # the embedded world behind the world: splits
    # data fingerprints: those the stage's checkpoint depends on
    data = stage_fingerprint(cfg, "sft")["data"]
    assert list(data) == [card_run["demos"]]
    for spec, files in data.items():
        for fp in files.values():
            assert f"| sft | `{spec}` | . | {fp['size']} | sha256 `{fp['sha256']}` |" in card
    assert "| sft | `world:demos_heldout` |" in card and "| pretrain | `world:corpus` |" in card
    # the eval rows of sft (and of no other model)
    section = card.split("## Evaluation", 1)[1].split("## Reproduce", 1)[0]
    assert "Measured on these weights by this run's eval stage" in section
    assert re.search(r"^\| eval_id \| \d\.\d{3} \|", section, re.M) and "| eval_ood |" in section
    assert "pretrain" not in section
    # the reproducing command: its override parses into the stages up to sft
    command = next(line for line in card.splitlines() if line.startswith("srppo-fast train --config config.yaml"))
    words = shlex.split(command)
    stages = [w for w in words if w.startswith("stages=")]
    assert len(stages) == 1
    again = load_config(str(out / "config.yaml"), stages)
    assert again.stages == ["pretrain", "sft"]
    assert shlex.join(["srppo-fast", *card_run["args"]]) in card  # the run's own command line
    resolved = yaml.safe_load(card.split("<details>", 1)[1].split("```yaml\n", 1)[1].split("\n```", 1)[0])
    assert resolved == yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))


def test_rerun_after_the_card_rewrite_still_skips(card_run, caplog):
    from srppo_fast.runner import run

    out = card_run["out"]
    cfg = load_config(QUICKSTART, card_run["overrides"])
    assert {n: s.action for n, s in preflight(cfg).statuses.items()} == {"pretrain": "skip", "sft": "skip",
                                                                         "eval": "start"}
    weights = (out / "checkpoints" / "sft" / "model.safetensors").stat().st_mtime_ns
    run(cfg)
    assert (out / "checkpoints" / "sft" / "model.safetensors").stat().st_mtime_ns == weights
    log = (out / "train.log").read_text().split("srppo-fast: run in")[-1]
    assert "stage pretrain: already complete" in log and "stage sft: already complete" in log
    card = (out / "checkpoints" / "sft" / "README.md").read_text(encoding="utf-8")
    assert card.count("## Evaluation") == 1 and is_complete(out / "checkpoints" / "sft")


def test_card_of_a_directory_base_names_it(card_run, tmp_path):
    base = str(card_run["out"] / "checkpoints" / "pretrain")
    out = tmp_path / "from_dir"
    overrides = [*tiny_run_overrides(out), "stages=[sft]", f"model.base={base}", "sft.init=base",
                 "model.tokenizer=auto", "sft.max_steps=1", "sft.eval_data=null"]
    assert main(["train", "--config", QUICKSTART, *overrides]) == 0
    card = (out / "checkpoints" / "sft" / "README.md").read_text(encoding="utf-8")
    assert _front_matter(card)["base_model"] == base
    assert f"| base model | `{base}` (a local directory) |" in card
    assert "The run was started from Python" in card  # pytest's argv is no srppo-fast command line


def test_a_resave_card_takes_the_rows_of_eval_json(card_run):
    """model_card alone (what a later save writes): eval.json's rows, flagged as older than the save; a
    mid-stage save says it is resumable."""
    from types import SimpleNamespace

    from srppo_fast.modelcard import model_card

    out = card_run["out"]
    cfg = load_config(QUICKSTART, card_run["overrides"])
    ctx = SimpleNamespace(cfg=cfg, out=out)
    card = model_card(ctx, "sft", {"stage": "sft", "step": 2, "complete": False})
    assert "a resumable mid-stage save after step 2" in card
    section = card.split("## Evaluation", 1)[1].split("## Reproduce", 1)[0]
    assert "From OUTPUT_DIR/eval.json" in section and "| eval_ood |" in section
    assert "## Evaluation" not in model_card(SimpleNamespace(cfg=cfg, out=out / "nowhere"), "sft", {"step": 4})


def test_an_rl_checkpoint_card(card_run, tmp_path):
    """srppo (one step, from a copy of the run's pretrain and sft): the actor's card names the coherent reward,
    the critic and its three stages."""
    out = tmp_path / "rl"
    shutil.copytree(card_run["out"] / "checkpoints", out / "checkpoints")
    shutil.copytree(card_run["out"] / "world", out / "world")
    overrides = [*card_run["overrides"][1:], f"output_dir={out}", "stages=[pretrain,sft,srppo]", "srppo.max_steps=1",
                 "srppo.prompts_per_step=4", "srppo.rollout.n_samples=2", "srppo.rollout.max_new_tokens=8",
                 "srppo.ppo.train_batch_size=8", "srppo.critic.warmup_buffers=0"]
    assert main(["train", "--config", QUICKSTART, *overrides]) == 0
    card = (out / "checkpoints" / "srppo" / "README.md").read_text(encoding="utf-8")
    assert _front_matter(card)["tags"] == ["srppo-fast", "srppo"]
    assert "Self-Rewarding PPO: PPO with the coherent reward log pi_SFT(y\\|x) - log pi_PT(y\\|x)" in card
    assert "| critic | the value model, in `critic/` |" in card
    assert "3. `srppo` (this checkpoint)" in card and "'stages=[pretrain,sft,srppo]'" in card
