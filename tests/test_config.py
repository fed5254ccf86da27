"""Config: YAML + overrides into typed sections; every bad input is one clear sentence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from srppo_fast.cli import main
from srppo_fast.config import Config, config_reference
from srppo_fast.config_load import load_config
from srppo_fast.errors import ConfigError

from .helpers import QUICKSTART

REPO = Path(__file__).resolve().parents[1]



def write(tmp_path, data) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_quickstart_loads_and_overrides_apply():
    cfg = load_config(QUICKSTART, ["sft.optim.lr=5e-5", "stages=pretrain,sft", "model.arch.hidden_size=64"])
    assert cfg.sft.optim.lr == 5e-5
    assert cfg.stages == ["pretrain", "sft"]
    assert cfg.model.arch["hidden_size"] == 64
    assert cfg.pretrain.loss_on == "all" and cfg.sft.loss_on == "response"


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; a float field must still take it
    cfg = load_config(write(tmp_path, "sft:\n  optim:\n    lr: 1e-4\n"))
    assert cfg.sft.optim.lr == pytest.approx(1e-4)


def test_partial_section_keeps_the_stage_defaults(tmp_path):
    # the pretrain section has its own optimiser defaults; overriding lr must not reset the others
    default = Config().pretrain.optim
    cfg = load_config(write(tmp_path, {"pretrain": {"optim": {"lr": 1e-3}}}))
    assert cfg.pretrain.optim.lr == 1e-3
    assert cfg.pretrain.optim.warmup_ratio == default.warmup_ratio
    assert cfg.pretrain.optim.weight_decay == default.weight_decay
    assert default.weight_decay != Config().sft.optim.weight_decay or default.warmup_ratio != \
        Config().sft.optim.warmup_ratio  # the defaults really differ, so the test means something


BAD = [
    # (raw config or None, overrides, substrings the message must contain)
    ({"sft": {"optim": {"lrr": 1e-4}}}, [], ["unknown config key 'sft.optim.lrr'", "did you mean 'sft.optim.lr'"]),
    ({"sft": {"epochs": "two"}}, [], ["sft.epochs", "expected a number", "'two'"]),
    ({"sft": {"batch_size": 0}}, [], ["sft.batch_size", "out of range", "at least 1"]),
    ({"stages": ["pretrain", "sfft"]}, [], ["unknown stage 'sfft'", "did you mean 'sft'"]),
    ({"stages": ["sft", "sft"]}, [], ["'sft' is listed twice"]),
    ({"sft": {"data": "no/such/file.jsonl"}}, [], ["sft.data", "'no/such/file.jsonl' does not exist"]),
    ({"stages": ["sft"], "sft": {"init": "pretrain"}}, [], ["sft.init is 'pretrain', which does not run before it",
                                                       "list 'pretrain' earlier in stages"]),
    ({"sft": {"micro_batch_tokens": 128, "max_seq_len": 512}}, [],
     ["sft.micro_batch_tokens (128) is smaller than sft.max_seq_len (512)"]),
    ({"sft": {"data": "world:demo"}}, [], ["unknown world split 'demo'", "world:demos"]),
    ({"model": {"tokenizer": "world", "base": "meta-llama/Llama-3-8B"}}, [],
     ["model.tokenizer is 'world' but model.base 'meta-llama/Llama-3-8B'", "set model.tokenizer=auto"]),
    ({"runtime": {"precision": "fp16"}}, [], ["runtime.precision", "'fp16' is not allowed", "'bf16'"]),
    ({"sft": {"shuffle": "yes"}}, [], ["sft.shuffle", "expected true or false"]),
    ({"sft": {"optim": {"betas": [0.9]}}}, [], ["sft.optim.betas must be two numbers"]),
    ({}, ["sft.optim.lr"], ["override 'sft.optim.lr' must look like key=value"]),
    ({}, ["seed.x=1"], ["'seed' is a value, not a section"]),
    ({"sft": 3}, [], ["sft: expected a mapping"]),
    ([1, 2], [], ["must hold a mapping of sections"]),
    ("a: [1, 2\n", [], ["is not valid YAML", "line"]),
    # the config means what it says
    ("", [], ["is empty", "list the stages"]),
    ("# every key commented out\n# sft:\n", [], ["is empty"]),
    ("sft:\n  optim:\n    lr: .inf\n", [], ["sft.optim.lr", "not a finite number"]),
    ("sft:\n  optim:\n    lr: .nan\n", [], ["sft.optim.lr", "not a finite number"]),
    ("srppo:\n  kl:\n    coef: -.inf\n", [], ["srppo.kl.coef", "not a finite number"]),
    ({}, ["sft.epochs=inf"], ["sft.epochs", "not a finite number"]),
    ({"seed": -1}, [], ["seed", "out of range", "at least 0"]),
    ({"world": {"seed": -3}}, [], ["world.seed", "out of range"]),
    ({"seed": 2**40}, [], ["seed", "out of range", "at most"]),
    ({"output_dir": ""}, [], ["output_dir is empty"]),
    ({"output_dir": "  "}, [], ["output_dir is empty"]),
    ({"stages": ["pretrain", "sft", "srppo"], "srppo": {"kl": {"placement": "loss"}}}, [],
     ["srppo.kl.placement is 'loss' with srppo.kl.estimator 'k1'", "k2 or k3"]),
    # bf16 accumulates in fp32 everywhere; DeepSpeed 0.19 cannot at ZeRO-0
    ({"runtime": {"engine": "deepspeed", "precision": "bf16"}, "deepspeed": {"zero_stage": 0}}, [],
     ["deepspeed.zero_stage 0 with bf16", "fp32", "Use zero_stage 2"]),
    ({"runtime": {"engine": "deepspeed", "precision": "bf16"}, "deepspeed": {"zero_stage": 1}}, [],
     ["deepspeed.zero_stage 1 with bf16", "BF16_Optimizer", "Use zero_stage 2"]),
]


@pytest.mark.parametrize("raw,overrides,needles", BAD, ids=[n[0] for _, _, n in BAD])
def test_bad_config_is_one_clear_error(tmp_path, raw, overrides, needles):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, raw), overrides)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_empty_sections_keep_their_documented_defaults(tmp_path):
    """`ppo_rm:` with its keys commented out must stay the PPO-RM baseline (reward.type model), and an empty
    `pretrain.optim:` keep pretraining's lr (3e-3), not the optimiser class's (1e-4)."""
    text = "stages: [pretrain, sft]\nppo_rm:\n  # reward:\n  #   model_path: rm/\npretrain:\n  optim:\n  # lr: 1\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.ppo_rm.reward.type == "model" and Config().srppo.reward.type == "coherent"
    assert cfg.pretrain.optim.lr == Config().pretrain.optim.lr == 3e-3
    assert cfg.pretrain.optim.warmup_ratio == Config().pretrain.optim.warmup_ratio
    cfg = load_config(write(tmp_path, "stages: [pretrain]\nsrppo:\n  kl:\n"))
    assert cfg.srppo.kl.coef == Config().srppo.kl.coef


def test_arch_overrides_merge_into_the_architecture(tmp_path):
    default = Config().model.arch
    for path in (write(tmp_path, {"stages": ["pretrain"]}), QUICKSTART):  # arch from defaults / from the YAML
        cfg = load_config(path, ["model.arch.hidden_size=256"])
        assert cfg.model.arch["hidden_size"] == 256
        assert cfg.model.arch["model_type"] == "llama"
        assert cfg.model.arch["num_hidden_layers"] == load_config(path).model.arch["num_hidden_layers"]
    cfg = load_config(write(tmp_path, {"model": {"arch": {"num_hidden_layers": 1}}}))
    assert cfg.model.arch == {**default, "num_hidden_layers": 1}
    # another model type starts from its own defaults, not llama's keys
    cfg = load_config(write(tmp_path, {"model": {"arch": {"model_type": "qwen2", "hidden_size": 64}}}))
    assert cfg.model.arch == {"model_type": "qwen2", "hidden_size": 64}


@pytest.mark.parametrize("kind", ["directory", "not_utf8"])
def test_config_path_problems_are_one_line(tmp_path, capsys, kind):
    path = tmp_path / "run.yaml"
    if kind == "directory":
        path.mkdir()
        needle = "is a directory"
    else:
        path.write_bytes(b"stages: [sft]\n# caf\xe9\n")
        needle = "is not UTF-8 text (byte 0xe9 at offset 19, line 2)"
    assert main(["train", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("srppo-fast: error: config file") and needle in err and err.count("\n") == 1, err


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_cli_prints_one_line_without_traceback(tmp_path, capsys):
    code = main(["train", "--config", write(tmp_path, {"sft": {"optim": {"lrr": 1}}}), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("srppo-fast: error: unknown config key 'sft.optim.lrr'")
    assert "Traceback" not in err and err.count("\n") == 1


def test_dry_run_prints_resolved_config_and_plan(capsys):
    assert main(["train", "--config", QUICKSTART, "--dry-run", "sft.epochs=3"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("plan (")[0])
    assert resolved["sft"]["epochs"] == 3.0
    assert "1. pretrain:" in out and "2. sft: init=pretrain" in out


def test_console_script_entry_point(tmp_path):
    # the installed `srppo-fast` is the same entry point; `python -m` avoids depending on PATH
    proc = subprocess.run([sys.executable, "-m", "srppo_fast", "train", "--config", "missing.yaml"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("srppo-fast: error: config file 'missing.yaml' does not exist; pass an existing "
                                   "YAML file to --config (e.g. configs/quickstart.yaml).")


def test_every_field_is_documented():
    rows = config_reference()
    assert len(rows) > 40
    undocumented = [key for key, _, _, help_ in rows if not help_.strip()]
    assert undocumented == []


def test_docs_config_reference_is_current():
    from srppo_fast.cli import REFERENCE_MARKERS, reference_markdown

    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    start, end = REFERENCE_MARKERS
    assert text.count(start) == 1 and text.count(end) == 1, "docs/config.md must hold the config-reference markers once"
    table = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == reference_markdown(), "docs/config.md's config reference is stale: run " \
        "`srppo-fast config --update-docs docs/config.md`"


def test_readme_links_every_docs_page():
    """The README is the front door: every page under docs/ is linked from it, and every docs/ link it holds exists
    (as do the links between the pages)."""
    import re

    docs = REPO / "docs"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "<!-- config-reference:start -->" not in readme, "the config reference lives in docs/config.md"
    after_marker = readme.split("<!-- ci:test-command -->\n", 1)[1]
    assert after_marker.startswith("```bash\n") and "pytest" in after_marker.split("```")[1], \
        ".ci/run reads the test command from the fenced block right after <!-- ci:test-command -->"
    pages = sorted(p.name for p in docs.glob("*.md"))
    assert "config.md" in pages and len(pages) > 5
    assert [p for p in pages if f"](docs/{p})" not in readme] == []
    for source in [REPO / "README.md", *sorted(docs.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", source.read_text(encoding="utf-8")):
            if "://" not in target:
                assert (source.parent / target).exists(), f"{source.name} links to {target}, which does not exist"


def test_config_command_lists_every_key(capsys):
    from srppo_fast.cli import main

    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "pretrain.epochs  [a number] = 3.0" in out and "srppo.kl.coef" in out
    assert out.count("\n    ") == len(config_reference())


def test_deepspeed_bf16_accumulates_and_reduces_in_fp32():
    """bf16 under ZeRO 2-3 (1 and 0 are refused): a step's micro-batch gradients summed in fp32 and reduced in
    fp32, as the torch engine sums them; frozen (inference) engines and fp32 runs need neither."""
    from srppo_fast.config import DeepSpeedConfig, OptimConfig
    from srppo_fast.engine.deepspeed_engine import ds_config

    for stage in (2, 3):
        cfg = ds_config(DeepSpeedConfig(zero_stage=stage), "bf16", optim=OptimConfig())
        assert cfg["data_types"] == {"grad_accum_dtype": "fp32"} and cfg["communication_data_type"] == "fp32"
        assert cfg["bf16"] == {"enabled": True}
    assert "data_types" not in ds_config(DeepSpeedConfig(zero_stage=2), "fp32", optim=OptimConfig())
    assert "data_types" not in ds_config(DeepSpeedConfig(zero_stage=3), "bf16", zero_stage=3)  # frozen
    # a user's deepspeed.config may still trade precision for bandwidth
    own = ds_config(DeepSpeedConfig(zero_stage=2, config={"communication_data_type": "bf16"}), "bf16",
                    optim=OptimConfig())
    assert own["communication_data_type"] == "bf16"
