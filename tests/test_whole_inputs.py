"""Every input is checked whole before anything is written, and the config means what it says: a bad record deep in
a later stage's file, text that is not Unicode, a bad environment variable, duplicate YAML keys, an alias bomb, a
config handed over through a pipe, a finished stage of another precision; a line too long to keep costs nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from srppo_fast.cli import main

from .helpers import QUICKSTART, require, tiny_run_overrides

FAST = ["pretrain.max_steps=2", "pretrain.batch_size=4", "sft.max_steps=1", "runtime.device=cpu"]


def one_error(argv: list[str], capsys) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("srppo-fast: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


BAD_LINES = {
    "bad JSON": (b'{"prompt": "1+2", "response": "3"', "not valid JSON"),
    "no answer": (b'{"messages": [{"role": "user", "content": "1+2"}]}', "no response to learn from"),
    "NUL byte": (b'{"prompt": "1+2\x00", "response": "3"}', "not valid JSON"),
    "lone surrogate": (b'{"prompt": "1+2 \\ud83d", "response": "3"}', "a lone UTF-16 surrogate U+D83D"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_a_bad_record_deep_in_a_later_stages_file_stops_the_run_before_anything_is_written(tmp_path, capsys,
                                                                                       world_dir, case):
    bad, problem = BAD_LINES[case]
    data = tmp_path / "demos.jsonl"
    good = Path(world_dir, "demos.jsonl").read_bytes().splitlines()
    lines = [good[i % len(good)] for i in range(300)] + [bad] + good[:5]
    data.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    argv = ["train", "--config", QUICKSTART, *tiny_run_overrides(out), *FAST, "stages=[pretrain,sft]",
            f"sft.data={data}"]
    line = one_error([*argv, "--dry-run"], capsys)  # the dry run finds it too
    assert f"{data}:301" in line and problem in line, line
    line = one_error(argv, capsys)  # pretrain would have run first: it does not
    assert f"{data}:301" in line and problem in line, line
    assert not out.exists()


def test_the_dry_run_says_every_record_was_read(tmp_path, capsys, world_dir):
    data = tmp_path / "demos.jsonl"
    shutil.copy(Path(world_dir, "demos.jsonl"), data)
    n = len(data.read_text().splitlines())
    assert main(["train", "--config", QUICKSTART, "--dry-run", *tiny_run_overrides(tmp_path / "out"), *FAST,
                 "stages=[pretrain,sft]", f"sft.data={data}"]) == 0
    assert f"'{data}': all {n} records parse and hold what the stage needs" in capsys.readouterr().out


def test_spin_data_must_end_with_the_answer_and_that_is_checked_first(tmp_path, capsys, world_dir):
    data = tmp_path / "demos.jsonl"
    records = [json.loads(line) for line in Path(world_dir, "demos.jsonl").read_text().splitlines()]
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for _ in range(5) for r in records]
    rows[37]["messages"].append({"role": "user", "content": "and?"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = one_error(["train", "--config", QUICKSTART, *tiny_run_overrides(tmp_path / "out"), *FAST,
                      "stages=[pretrain,sft,spin]", f"spin.data={data}"], capsys)
    assert f"{data}:38" in line and "end with the assistant's turn" in line


def test_a_line_too_long_to_keep_is_never_tokenized_whole(tokenizer, monkeypatch):
    """A 5 MB response (dropped as longer than max_seq_len): tokenizing it cost 16 s and 2.2 GB before; now the
    tokenizer sees at most max_seq_len x its longest token's characters of it, and the other records as before."""
    from srppo_fast.data import Record
    from srppo_fast.tokens import max_token_chars, tokenize_records

    records = [Record(f"f:{i}", messages=[{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}])
               for i in range(3)]
    records.insert(1, Record("f:long", messages=[{"role": "user", "content": "1+2"},
                                                 {"role": "assistant", "content": "12 34 " * 800_000}]))
    seen = []
    call = type(tokenizer).__call__

    def spy(self, texts, *args, **kwargs):
        seen.append(max(len(t) for t in texts))
        return call(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    bound = 64 * max_token_chars(tokenizer) + 1
    dropped = tokenize_records(records, tokenizer, loss_on="response", max_seq_len=64, overlong="drop")
    assert dropped.dropped == 1 and len(dropped) == 3 and max(seen) < bound
    truncated = tokenize_records(records, tokenizer, loss_on="response", max_seq_len=64, overlong="truncate")
    assert truncated.truncated == 1 and len(truncated) == 4 and max(truncated.lengths) == 64
    assert max(seen) <= bound
    from srppo_fast.errors import DataError

    with pytest.raises(DataError, match=r"f:long: 4,800,0\d\d characters, more than max_seq_len=64 tokens"):
        tokenize_records(records, tokenizer, loss_on="response", max_seq_len=64, overlong="error")


@pytest.mark.parametrize("name,value,problem", [
    ("SRPPO_FAST_IMPL", "tritn", "SRPPO_FAST_IMPL is 'tritn'; set it to auto, torch or triton"),
    ("SRPPO_FAST_DS_SHM", "yes", "SRPPO_FAST_DS_SHM is 'yes'"),
])
def test_a_bad_environment_variable_is_a_config_error_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                                                name, value, problem):
    monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    argv = ["train", "--config", QUICKSTART, *tiny_run_overrides(out), *FAST, "stages=[pretrain]"]
    assert problem in one_error([*argv, "--dry-run"], capsys)
    assert problem in one_error(argv, capsys)
    assert not out.exists()


def test_triton_on_the_cpu_needs_the_interpreter(tmp_path, capsys, monkeypatch):
    """What the machine lacks follows the one rule (machine.problems): a run stops at it before writing anything, a
    dry run lists it and plans on."""
    require("triton")
    monkeypatch.setenv("SRPPO_FAST_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "out"
    argv = ["train", "--config", QUICKSTART, *tiny_run_overrides(out), *FAST]
    assert main([*argv, "--dry-run"]) == 0
    assert "NOT ON THIS MACHINE: SRPPO_FAST_IMPL is triton but the run computes on the CPU" in capsys.readouterr().out
    assert "set TRITON_INTERPRET=1 too" in one_error(argv, capsys)
    assert not out.exists()


def test_duplicate_yaml_keys_are_refused_with_both_lines(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("stages: [pretrain]\npretrain:\n  max_steps: 2\n  batch_size: 4\nsft:\n  epochs: 1\n"
                      "pretrain:\n  micro_batch_tokens: 512\n")
    line = one_error(["train", "--config", str(config), "--dry-run"], capsys)
    assert "key 'pretrain' appears twice in one mapping (lines 2 and 7)" in line
    config.write_text("pretrain:\n  optim:\n    lr: 1.0e-3\n    lr: 2.0e-3\n")
    assert "key 'lr' appears twice in one mapping (lines 3 and 4)" in one_error(
        ["train", "--config", str(config), "--dry-run"], capsys)
    # a merge key is not a duplicate: keys beside it override the merged ones (the quickstart's sft_extended)
    config.write_text("stages: [pretrain, sft, sft_extended]\nsft: &s\n  epochs: 2\n  batch_size: 8\n"
                      "sft_extended:\n  <<: *s\n  epochs: 6\n")
    from srppo_fast.config_load import load_config

    cfg = load_config(str(config), [f"output_dir={tmp_path / 'o'}"])
    assert (cfg.sft_extended.epochs, cfg.sft_extended.batch_size) == (6, 8)


def test_an_alias_bomb_is_refused_at_once_and_never_rendered(tmp_path):
    """Nine aliases of nine aliases ... (9^9 values once expanded) under a typed key: refused by its expanded size,
    in a subprocess that must finish well before a render of the value would (minutes, gigabytes)."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    config = tmp_path / "bomb.yaml"
    config.write_text("world:\n  seed: 0\nbombs:\n" + "".join(f"  {line}\n" for line in levels)
                      + "sft:\n  epochs: *a8\n")
    done = subprocess.run([sys.executable, "-m", "srppo_fast", "train", "--config", str(config), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "expands to" in done.stderr and "values once its YAML aliases are resolved" in done.stderr
    assert len(done.stderr) < 1000


def test_a_config_handed_over_through_a_pipe_is_read(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", "-c", f'"{sys.executable}" -m srppo_fast train --config <(cat {QUICKSTART}) '
                           f"--dry-run output_dir={out}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "plan (output_dir:" in done.stdout and not out.exists()


def test_precision_makes_a_finished_stage_different_and_how_it_computes_does_not(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train", "--config", QUICKSTART, *tiny_run_overrides(out), *FAST, "stages=[pretrain]",
            "runtime.precision=fp32"]
    assert main(argv) == 0
    capsys.readouterr()
    config_yaml = (out / "config.yaml").read_text()
    line = one_error([*argv, "runtime.precision=bf16"], capsys)
    assert "holds a finished run of a different config (changed: config keys precision)" in line, line
    assert (out / "config.yaml").read_text() == config_yaml  # refused before the resolved config was rewritten
    for same in ("model.attn_implementation=sdpa", "model.gradient_checkpointing=true"):
        assert main([*argv, same]) == 0
        assert "stage pretrain: already complete" in capsys.readouterr().err


def test_an_overlong_prompt_is_never_tokenized_whole(tokenizer, world_dir, tmp_path, monkeypatch):
    """RL prompts and SPIN's demonstrations dropped as longer than max_prompt_len / max_seq_len: the tokenizer
    sees at most the characters that prove it, not the 2 MB."""
    from srppo_fast.rl.run import load_prompts
    from srppo_fast.spin_pairs import Demos
    from srppo_fast.tokens import max_token_chars

    data = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in Path(world_dir, "demos.jsonl").read_text().splitlines()]
    rows.insert(2, {"prompt": "12 34 " * 350_000, "response": "3"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    call = type(tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(len(text) if isinstance(text, str) else max(len(t) for t in text))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    prompts, dropped = load_prompts(str(data), tokenizer, None, 32)
    assert dropped == 1 and len(prompts.ids) == len(rows) - 1
    assert max(seen) <= 32 * max_token_chars(tokenizer) + 1
    seen.clear()
    demos = Demos(str(data), tokenizer, None, 32, 128, "spin.data")
    assert demos.dropped == 1 and len(demos.prompts) == len(rows) - 1
    assert max(seen) <= 128 * max_token_chars(tokenizer) + 1


def test_what_the_machine_lacks_follows_one_rule(tmp_path, capsys):
    """A GPU config checked on this CPU machine: every problem of the machine (no CUDA device, flash-attn on CUDA
    only) is listed by the dry run, which plans on; the run stops at the first; nothing is written."""
    out = tmp_path / "out"
    argv = ["train", "--config", QUICKSTART, *tiny_run_overrides(out), *FAST, "stages=[pretrain,sft,srppo]",
            "runtime.device=cuda", "model.attn_implementation=flash_attention_2"]
    assert main([*argv, "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "NOT ON THIS MACHINE" in line]
    assert len(listed) == 2, listed
    assert "runtime.device is 'cuda' but no CUDA device is visible" in listed[0]
    assert "flash_attention_2', which runs on CUDA only" in listed[1]
    assert "runtime.device is 'cuda' but no CUDA device is visible" in one_error(argv, capsys)
    assert not out.exists()
