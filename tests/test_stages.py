"""Stages as named instances of their kinds: a config holding two SRPPO stages (a beta sweep) loads, names both in
config.yaml, the plan, the eval table, the model cards and the report, and runs end to end; the kinds' registry is
the one place kinds are listed, and the package's import graph has no cycle."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import yaml

from srppo_fast.checks import is_our_config_yaml, resolved_config_text, stage_fingerprint
from srppo_fast.cli import main
from srppo_fast.config import STAGE_TYPES
from srppo_fast.config_load import load_config
from srppo_fast.errors import ConfigError
from srppo_fast.stages import KINDS, stage_of

from .helpers import QUICKSTART, TINY_RL, tiny_run_overrides

PACKAGE = Path(__file__).resolve().parents[1] / "srppo_fast"
SWEEP = ["srppo_b02.kind=srppo", "srppo_b02.kl.coef=0.2", "srppo_b1.kind=srppo", "srppo_b1.kl.coef=1.0"]


def sweep_config(tmp_path: Path, extra=()):
    return load_config(QUICKSTART, [f"output_dir={tmp_path}", *SWEEP, "stages=[pretrain,sft,srppo_b02,srppo_b1,eval]",
                                    *extra])


def test_a_named_stage_is_a_copy_of_its_types_section_with_its_own_changes(tmp_path):
    cfg = sweep_config(tmp_path, ["srppo.max_steps=7"])
    for name, coef in (("srppo_b02", 0.2), ("srppo_b1", 1.0)):
        assert cfg.stage_type(name) == "srppo" and stage_of(cfg, name).kind == "rl"
        section = cfg.section(name)
        assert section.kl.coef == coef
        assert section.max_steps == 7  # what the config sets in `srppo` carries over
        assert section.rollout.max_new_tokens == cfg.srppo.rollout.max_new_tokens
        assert section is not cfg.srppo and section.rollout is not cfg.srppo.rollout
    assert cfg.label("srppo_b1") == "SRPPO (srppo_b1)" and cfg.label("srppo") == "SRPPO" and cfg.label("x/y") == "x/y"
    assert stage_of(cfg, "eval").model_refs() == ["pretrain", "sft", "srppo_b02", "srppo_b1"]
    # config.yaml holds each named section whole, with its kind, and reads back to the same stages
    dumped = yaml.safe_load(resolved_config_text(cfg))
    assert dumped["srppo_b1"]["kind"] == "srppo" and dumped["srppo_b1"]["kl"]["coef"] == 1.0
    (tmp_path / "again.yaml").write_text(resolved_config_text(cfg))
    again = load_config(str(tmp_path / "again.yaml"))
    for name in cfg.stages:
        assert stage_fingerprint(again, name) == stage_fingerprint(cfg, name)
    # an output_dir whose config.yaml lost its header (an older run, an edit) is still recognised as a run's
    bare = tmp_path / "bare.yaml"
    bare.write_text("".join(line for line in resolved_config_text(cfg).splitlines(keepends=True)
                            if not line.startswith("#")))
    assert is_our_config_yaml(bare)
    # the two stages differ only where they were told to, and their fingerprints say so
    b02, b1 = stage_fingerprint(cfg, "srppo_b02"), stage_fingerprint(cfg, "srppo_b1")
    assert b02["srppo_b02"]["kind"] == "srppo" and b02["srppo_b02"]["kl"]["coef"] == 0.2
    assert {**b1["srppo_b1"], "kl": None} == {**b02["srppo_b02"], "kl": None}


BAD = [
    (["x1.kind=srpo", "stages=[pretrain,sft,x1]"], "x1.kind: 'srpo' is not a stage type; did you mean 'srppo'?"),
    (["x1.kl.coef=1", "stages=[pretrain,sft,x1]"], "add `kind:`"),
    (["sft.kind=sft"], "'sft' is a stage type's own section, which takes no kind"),
    (["base.kind=srppo"], "is not 'base'"),
    (["9lives.kind=srppo"], "starts with a letter"),
    (["x1.kind=srppo", "x1.kl.cof=1", "stages=[pretrain,sft,x1]"], "unknown config key 'x1.kl.cof'"),
    (["x1.kind=srppo", "stages=[pretrain,sft,x1,x1]"], "listed twice"),
    (["x1.kind=srppo", "x1.reward.sft=x2", "x2.kind=sft", "stages=[pretrain,sft,x1,x2]"],
     "x1.reward.sft is 'x2', which does not run before it"),
    (["stages=[pretrain,sft,srppo_b3]"], "A section of your own name with `kind: <stage type>` is a stage too"),
]


@pytest.mark.parametrize("overrides,needle", BAD)
def test_bad_named_stages_are_one_line_each(tmp_path, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, [f"output_dir={tmp_path}", *overrides])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_named_stage_reads_an_earlier_named_stage(tmp_path):
    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", "sft_long.kind=sft", "sft_long.epochs=4",
                                   "srppo.init=sft_long", "stages=[pretrain,sft,sft_long,srppo,eval]"])
    assert stage_of(cfg, "srppo").model_refs()[0] == "sft_long" and cfg.makes_model("sft_long")
    assert cfg.section("sft_long").epochs == 4 and cfg.section("sft_long").data == cfg.sft.data


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert main(["train", "--config", QUICKSTART, *tiny_run_overrides(out), "stages=[pretrain,sft]"]) == 0
    return out


def test_two_srppo_stages_of_different_kl_run_end_to_end(sft_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sft_run, out)
    args = ["--config", QUICKSTART, *tiny_run_overrides(out), *TINY_RL, *SWEEP,
            "stages=[pretrain,sft,srppo_b02,srppo_b1,eval]"]
    assert main(["train", *args, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "3. srppo_b02: actor=sft" in plan and "kl=0.2(" in plan and "4. srppo_b1: actor=sft" in plan \
        and "kl=1(" in plan
    assert main(["train", *args]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name in ("srppo_b02", "srppo_b1"):
        assert [r["step"] for r in rows if r.get("stage") == name and "step" in r and "reward/total" in r] == [1, 2]
        card = (out / "checkpoints" / name / "README.md").read_text()
        assert f"# SRPPO ({name}) (`{name}`)" in card and "coef: " in card and "## Evaluation" in card
    results = json.loads((out / "eval.json").read_text())
    assert list(results) == ["pretrain", "sft", "srppo_b02", "srppo_b1"]
    table = (out / "eval.md").read_text()
    assert "| SRPPO (srppo_b02) |" in table and "| SRPPO (srppo_b1) |" in table
    kls = {name: [r["reward/kl"] for r in rows if r.get("stage") == name and "reward/kl" in r]
           for name in ("srppo_b02", "srppo_b1")}
    assert kls["srppo_b02"][0] == kls["srppo_b1"][0] == 0  # step 1: the actor is still the reference
    assert kls["srppo_b02"][1] != kls["srppo_b1"][1] and kls["srppo_b1"][1] != 0  # then the betas differ
    assert main(["report", str(out)]) == 0
    pngs = sorted(p.name for p in (out / "report").iterdir())
    assert "srppo_b02.png" in pngs and "srppo_b1.png" in pngs
    html = (out / "report" / "index.html").read_text()
    assert "srppo_b02" in html and "srppo_b1" in html
    # run again: both are complete and skipped
    assert main(["train", *args]) == 0
    log = (out / "train.log").read_text()
    assert "stage srppo_b02: already complete" in log and "stage srppo_b1: already complete" in log


def test_every_stage_type_has_a_kind_and_kinds_are_listed_once():
    section_types = [k.section_type for k in KINDS]
    assert len(set(section_types)) == len(KINDS) and len({k.kind for k in KINDS}) == len(KINDS)
    cfg = load_config(QUICKSTART, ["output_dir=/nonexistent/x"], check_files=False)
    for name in STAGE_TYPES:
        assert type(cfg.section(name)) in section_types


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The package modules `module` imports anywhere in its file (function bodies included)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t not in modules and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in modules and t != module and not module.startswith(t + "."):
                found.add(t)
    return found


def test_the_package_import_graph_has_no_cycle():
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {m: _imports(p, m, set(files)) for m, p in files.items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(n):] + [n]))
            if n not in state:
                visit(n, trail + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
