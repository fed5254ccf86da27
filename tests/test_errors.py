"""A user's mistake or an ordinary OS/data error ends with one line, `srppo-fast: error: ...`, naming the path
and the fix: exit code 2, no traceback. Every case runs the real CLI entry (`main([...])`; two through a
subprocess of the installed script) and fails before any training or benchmark runs.

Unreadable files: `chmod 000` cannot stop root, so under root those cases make `open` (only in the module
under test) raise the PermissionError the OS would; the chmod variants run for other users only."""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import srppo_fast.io
from srppo_fast import cli
from srppo_fast.cli import main
from srppo_fast.errors import DataError
from srppo_fast.metrics import MetricsLog, read_metrics

from .helpers import IN_CI, require

REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0
not_root = pytest.mark.skipif(ROOT, reason="root reads and writes whatever the mode bits say")
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) ")  # the run's log on stderr (train only)


def error_line(argv: list[str], capsys, *, log_lines_ok: bool = False) -> str:
    """Run the CLI; assert exit 2 and exactly one `srppo-fast: error:` line on stderr (plus, for train, only
    the run's log lines before it) and no traceback; return the error line."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    if log_lines_ok:
        lines = [line for line in lines if not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("srppo-fast: error: "), err
    return lines[0]


def deny_open(monkeypatch, module, path) -> None:
    """`open(path)` in `module` raises PermissionError, as for a file this user may not read."""
    real = open

    def fake(file, *args, **kwargs):
        if os.path.abspath(os.fspath(file)) == os.path.abspath(os.fspath(path)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(module, "open", fake, raising=False)


def make_unreadable(monkeypatch, module, path) -> None:
    """`path` cannot be read by this user: mode 0, or (root reads anything) `open` in `module` refuses it."""
    if ROOT:
        deny_open(monkeypatch, module, path)
    else:
        path.chmod(0)


# ---------------------------------------------------------------------------------------------
# A. data files, through `srppo-fast train` (the data is read before any model is built)

TINY = ["world.seed=0", "world.num_corpus_docs=300", "world.num_demos=8", "world.num_demos_heldout=16",
        "world.num_prompts=40", "world.num_eval=20"]


def train_on(data, tmp_path, capsys) -> str:
    argv = ["train", "--config", str(REPO / "configs" / "quickstart.yaml"), f"output_dir={tmp_path / 'run'}",
            "stages=[sft]", "sft.init=base", "sft.eval_data=null", "runtime.progress=false", "logging.backends=[jsonl]",
            *TINY, f"sft.data={data}"]
    return error_line(argv, capsys, log_lines_ok=True)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


GOOD = '{"prompt": "1+1", "response": "answer 2"}\n'


def test_data_file_not_utf8_names_file_and_line(tmp_path, capsys):
    path = write(tmp_path / "d.jsonl", GOOD.encode() + b'{"prompt": "caf\xe9", "response": "x"}\n')
    line = train_on(path, tmp_path, capsys)
    assert line == f"srppo-fast: error: {path}:2: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8."


@pytest.mark.parametrize("content,kind", [
    (gzip.compress(GOOD.encode() * 3), "gzip-compressed; decompress it (gunzip)"),
    (bytes(range(256)) * 4, "a binary file (NUL bytes); give JSON Lines text, one JSON object per line"),
    (GOOD.encode("utf-16"), "UTF-16 text; save it as UTF-8"),
], ids=["gzip", "binary", "utf16"])
def test_data_file_that_is_binary(tmp_path, capsys, content, kind):
    path = write(tmp_path / "d.jsonl", content)
    assert train_on(path, tmp_path, capsys) == f"srppo-fast: error: '{path}' is not JSON Lines text: it is {kind}."


def test_data_file_unreadable(tmp_path, capsys, monkeypatch):
    import srppo_fast.data

    path = write(tmp_path / "d.jsonl", GOOD)
    make_unreadable(monkeypatch, srppo_fast.data, path)
    assert train_on(path, tmp_path, capsys) == (f"srppo-fast: error: cannot read the data file '{path}': Permission "
                                                "denied; check that this user may read it.")


def test_data_directory_empty(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".hidden").write_text("x")  # hidden files are not data (nor for `datasets`)
    line = train_on(tmp_path / "data", tmp_path, capsys)
    assert line == (f"srppo-fast: error: the data directory '{tmp_path / 'data'}' is empty; put .jsonl files (or a "
                    "dataset saved with Dataset.save_to_disk) in it, or point the data key at a .jsonl file.")


def test_data_directory_without_data_files(tmp_path, capsys):
    require("datasets")
    write(tmp_path / "data" / "README.md", "# my data\n")
    line = train_on(tmp_path / "data", tmp_path, capsys)
    assert line.startswith(f"srppo-fast: error: the data directory '{tmp_path / 'data'}' holds no data files the "
                           "`datasets` library reads (found README.md); put .jsonl")


def test_model_directory_given_as_data(tmp_path, capsys):
    write(tmp_path / "ckpt" / "config.json", '{"model_type": "llama"}')
    write(tmp_path / "ckpt" / "model.safetensors", b"\0" * 64)
    line = train_on(tmp_path / "ckpt", tmp_path, capsys)
    assert line == (f"srppo-fast: error: '{tmp_path / 'ckpt'}' is a model or tokenizer directory (it holds "
                    "config.json, model.safetensors), not data; give a .jsonl file or a dataset directory as data, "
                    "and model directories to model.base or init.")


def test_data_directory_with_a_bad_jsonl_line_names_file_and_line(tmp_path, capsys):
    require("datasets")
    bad = write(tmp_path / "data" / "train.jsonl", GOOD + '{"prompt": "2+2", "response"\n')
    line = train_on(tmp_path / "data", tmp_path, capsys)
    assert line.startswith(f"srppo-fast: error: {bad}:2: not valid JSON")


def test_data_directory_the_datasets_library_rejects(tmp_path, capsys):
    require("datasets")
    write(tmp_path / "data" / "train.jsonl", GOOD)
    write(tmp_path / "data" / "train2.jsonl", '{"question": 1}\n')  # columns that do not match
    line = train_on(tmp_path / "data", tmp_path, capsys)
    assert line.startswith(f"srppo-fast: error: could not read the data directory '{tmp_path / 'data'}' "
                           "(DatasetGenerationError: ")
    assert line.endswith("; fix its files, or convert the data to one .jsonl file.")


def test_saved_dataset_directory_that_is_corrupt(tmp_path, capsys):
    datasets = require("datasets")
    datasets.Dataset.from_list([{"prompt": "1+1", "response": "answer 2"}]).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "ds" / "state.json").write_text("{}")
    capsys.readouterr()  # save_to_disk's progress bar
    line = train_on(tmp_path / "ds", tmp_path, capsys)
    assert line.startswith(f"srppo-fast: error: could not read the data directory '{tmp_path / 'ds'}' (")


@not_root
def test_data_directory_unlistable(tmp_path, capsys):
    write(tmp_path / "data" / "train.jsonl", GOOD)
    (tmp_path / "data").chmod(0)
    try:
        line = train_on(tmp_path / "data", tmp_path, capsys)
    finally:
        (tmp_path / "data").chmod(0o755)
    assert line.startswith(f"srppo-fast: error: cannot read the data directory '{tmp_path / 'data'}': Permission "
                           "denied")


# ---------------------------------------------------------------------------------------------
# B. srppo-fast report, and read_metrics

ROWS = [{"stage": "sft", "step": 1, "loss": 2.0}, {"stage": "sft", "step": 2, "loss": 1.5}]


def run_dir(tmp_path, text: str | bytes) -> Path:
    write(tmp_path / "run" / "metrics.jsonl", text)
    return tmp_path / "run"


def lines(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_report_run_dir_missing_or_a_file(tmp_path, capsys):
    assert error_line(["report", str(tmp_path / "nope")], capsys) == (
        f"srppo-fast: error: '{tmp_path / 'nope'}' does not exist; give the output_dir of a run (the directory "
        "holding metrics.jsonl).")
    metrics = run_dir(tmp_path, lines(ROWS)) / "metrics.jsonl"
    assert error_line(["report", str(metrics)], capsys) == (
        f"srppo-fast: error: '{metrics}' is a file, not a directory; give the output_dir of a run (the directory "
        "holding metrics.jsonl).")


def test_report_without_metrics_file(tmp_path, capsys):
    assert error_line(["report", str(tmp_path)], capsys) == (
        f"srppo-fast: error: {tmp_path / 'metrics.jsonl'} does not exist; give the output_dir of a run that has "
        "logged a step (srppo-fast report RUN_DIR).")
    (tmp_path / "metrics.jsonl").mkdir()
    assert error_line(["report", str(tmp_path)], capsys).startswith(
        f"srppo-fast: error: {tmp_path / 'metrics.jsonl'} is not a file; ")


@pytest.mark.parametrize("text", ["", "\n  \n"], ids=["empty", "blank"])
def test_report_empty_metrics(tmp_path, capsys, text):
    run = run_dir(tmp_path, text)
    assert error_line(["report", str(run)], capsys) == (
        f"srppo-fast: error: {run / 'metrics.jsonl'} has no rows; the run has not logged a step yet: report it once "
        "it has.")


def test_report_skips_a_truncated_last_line_with_one_warning(tmp_path, capsys):
    require("matplotlib")
    run = run_dir(tmp_path, lines(ROWS) + '{"stage": "sft", "step": 3, "lo')
    assert main(["report", str(run)]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"srppo-fast: warning: {run / 'metrics.jsonl'}:3: skipped the last line, not valid "
                                "JSON at column 29 (Unterminated string starting at): cut short when the run was "
                                "killed?"]
    assert out.split() == [str(run / "report" / "sft.png"), str(run / "report" / "index.html")]
    assert (run / "report" / "sft.png").stat().st_size > 0


def test_report_only_a_truncated_line(tmp_path, capsys):
    require("matplotlib")
    run = run_dir(tmp_path, '{"stage": "sft", "st')
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"srppo-fast: warning: {run / 'metrics.jsonl'}:1: skipped")
    assert err[1].startswith(f"srppo-fast: error: {run / 'metrics.jsonl'} has no rows") and "Traceback" not in err[1]


@pytest.mark.parametrize("bad,problem", [
    ('{"stage": "sft", "st', "not valid JSON at column 18 (Unterminated string starting at)"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"step": 2, "loss": 1.0}', "a row without 'stage' (every row srppo-fast logs has one)"),
    ('{"stage": null, "step": 2}', "'stage' is NoneType, not str"),
], ids=["cut", "list", "no_stage", "stage_null"])
def test_report_bad_line_in_the_middle_names_file_and_line(tmp_path, capsys, bad, problem):
    require("matplotlib")
    run = run_dir(tmp_path, lines(ROWS[:1]) + bad + "\n" + lines(ROWS[1:]))
    assert error_line(["report", str(run)], capsys) == (
        f"srppo-fast: error: {run / 'metrics.jsonl'}:2: {problem}; every line of a metrics log is one JSON object "
        "written by srppo-fast: repair or delete that line.")


def test_report_row_without_stage_last_is_an_error_not_a_truncation(tmp_path, capsys):
    """A whole JSON row without "stage" cannot be a write cut short: an error even as the last line."""
    require("matplotlib")
    run = run_dir(tmp_path, lines(ROWS) + '{"step": 3, "loss": 1.0}\n')
    assert error_line(["report", str(run)], capsys).startswith(
        f"srppo-fast: error: {run / 'metrics.jsonl'}:3: a row without 'stage'")


def test_report_metrics_not_utf8(tmp_path, capsys):
    require("matplotlib")
    run = run_dir(tmp_path, lines(ROWS).encode() + b'{"stage": "caf\xe9"}\n' + lines(ROWS).encode())
    assert error_line(["report", str(run)], capsys).startswith(
        f"srppo-fast: error: {run / 'metrics.jsonl'}:3: not UTF-8 text (byte 0xe9 at column 15); ")


def test_report_metrics_unreadable(tmp_path, capsys, monkeypatch):
    import srppo_fast.metrics

    require("matplotlib")
    metrics = run_dir(tmp_path, lines(ROWS)) / "metrics.jsonl"
    make_unreadable(monkeypatch, srppo_fast.metrics, metrics)
    assert error_line(["report", str(tmp_path / "run")], capsys) == (
        f"srppo-fast: error: cannot read {metrics}: Permission denied; check that this user may read it.")


def test_report_dir_is_a_file(tmp_path, capsys):
    require("matplotlib")
    run = run_dir(tmp_path, lines(ROWS))
    (run / "report").write_text("my notes")
    assert error_line(["report", str(run)], capsys) == (
        f"srppo-fast: error: {run / 'report'} exists and is not a directory; move or delete it, the report is "
        "written there.")
    assert (run / "report").read_text() == "my notes"


def test_report_cannot_write(tmp_path, capsys, monkeypatch):
    """Simulated for every user (root writes anywhere): writing the figure fails as on a read-only directory."""
    require("matplotlib")

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, "tmpname"))

    monkeypatch.setattr(srppo_fast.io.tempfile, "mkstemp", denied)
    run = run_dir(tmp_path, lines(ROWS))
    assert error_line(["report", str(run)], capsys) == (
        f"srppo-fast: error: cannot write {run / 'report' / 'sft.png'}: Permission denied; check the permissions of "
        f"{run / 'report'}.")


def test_report_nothing_to_draw(tmp_path, capsys):
    require("matplotlib")
    run = run_dir(tmp_path, lines([{"stage": "eval", "model": "sft", "split": "eval_id", "accuracy": 0.5}]))
    assert error_line(["report", str(run)], capsys) == (
        f"srppo-fast: error: {run / 'metrics.jsonl'}: none of its 1 rows has a step and a plotted value (loss, "
        "reward, ...); nothing to draw yet.")


def test_report_stage_name_is_never_a_path(tmp_path, capsys):
    require("matplotlib")
    run = run_dir(tmp_path, lines([{"stage": "../escape", "step": 1, "loss": 1.0}]))
    assert main(["report", str(run)]) == 0
    report = run / "report"
    assert capsys.readouterr().out.split() == [str(report / ".._escape.png"), str(report / "index.html")]


def test_read_metrics_strict_by_default_tolerant_on_request(tmp_path):
    path = write(tmp_path / "metrics.jsonl", lines(ROWS) + '{"stage": "sft", "st')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not valid JSON")):
        read_metrics(path)
    warnings = []
    assert read_metrics(path, on_truncated_tail=warnings.append) == ROWS
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}:3: skipped the last line")
    path.write_text(lines(ROWS[:1]) + "{bad\n" + lines(ROWS[1:]))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ")):  # in the middle: never skipped
        read_metrics(path, on_truncated_tail=warnings.append)
    path.write_text(lines(ROWS) + "\n")
    assert read_metrics(path, require={"stage": str}) == ROWS


def test_metrics_log_reopened_drops_a_partial_last_line(tmp_path):
    """A resumed run must not glue its first record onto the killed run's half-written line."""
    path = write(tmp_path / "metrics.jsonl", lines(ROWS) + '{"stage": "sft", "st')
    MetricsLog(path).log({"stage": "sft", "step": 3, "loss": 1.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# C. srppo-fast bench: names are checked before any benchmark runs


@pytest.fixture
def no_benchmark_runs(monkeypatch):
    """Replace each benchmark's main by a recorder: a test that reaches one sees its argv, nothing is timed."""
    sys.path.insert(0, str(REPO))
    import importlib

    calls = []
    for name, module in cli.BENCHMARKS.items():
        mod = importlib.import_module(f"benchmarks.{module}")
        monkeypatch.setattr(mod, "main", lambda argv=None, name=name: calls.append((name, argv)))
    return calls


KNOWN_PROVIDERS = ("logprobs: torch, compile, ours, liger, flash_attn; linear_logprobs: torch, compile, ours, liger, "
                   "cce; gae: loop, compile, ours, reference_fused, ours_fused; ppo_loss: torch, compile, ours")


@pytest.mark.parametrize("argv,message", [
    (["--providers", "nosuch"], f"--providers: unknown provider nosuch for bench --op all; known providers: "
                                f"{KNOWN_PROVIDERS}."),
    (["--op", "logprobs", "--providers", "torch,nosuch"], "--providers: unknown provider nosuch for bench --op "
                                                          "logprobs; known providers: torch, compile, ours, liger, "
                                                          "flash_attn."),
    (["--op", "ppo_loss", "--modes", "fwd,nosuch"], "--modes: unknown mode nosuch for bench --op ppo_loss; known "
                                                    "modes: fwd, bwd, full."),
    (["--modes", "nosuch"], "--modes: unknown mode nosuch for bench --op all; known modes: logprobs: fwd, bwd, full; "
                            "linear_logprobs: fwd, bwd, full; gae: fwd; ppo_loss: fwd, bwd, full."),
    (["--op", "gae", "--modes", "bwd"], "--modes: unknown mode bwd for bench --op gae; known modes: fwd."),
    (["--op", "gae", "--providers", ","], "--providers: ',' names no provider for bench --op gae; known providers: "
                                          "loop, compile, ours, reference_fused, ours_fused."),
    (["--op", "packing", "--providers", "torch"], "bench --op packing takes neither --providers nor --modes (they "
                                                  "pick kernel benchmark variants); drop them."),
], ids=["all_provider", "one_provider", "one_mode", "all_mode", "gae_bwd", "empty_list", "packing"])
def test_bench_unknown_names(capsys, no_benchmark_runs, argv, message):
    assert error_line(["bench", "--quick", *argv], capsys) == f"srppo-fast: error: {message}"
    assert no_benchmark_runs == []


def test_bench_all_gives_each_benchmark_the_names_it_knows(capsys, no_benchmark_runs):
    assert main(["bench", "--quick", "--providers", "loop,ours", "--modes", "bwd"]) == 0
    assert no_benchmark_runs == [
        ("logprobs", ["--quick", "--providers=ours", "--modes=bwd"]),
        ("linear_logprobs", ["--quick", "--providers=ours", "--modes=bwd"]),
        ("ppo_loss", ["--quick", "--providers=ours", "--modes=bwd"]),
        ("packing", ["--quick"]),
    ]
    assert "bench gae: skipped (none of the requested providers/modes is one of its own" in capsys.readouterr().out


def test_bench_script_alone_rejects_unknown_names():
    sys.path.insert(0, str(REPO))
    from benchmarks.common import pick

    assert pick("", ["a", "b"]) == ["a", "b"] and pick("b,", ["a", "b"]) == ["b"]
    with pytest.raises(SystemExit, match="unknown mode c; known: a, b"):
        pick("a,c", ["a", "b"], "mode")


# ---------------------------------------------------------------------------------------------
# D. srppo-fast config --update-docs (docs/config.md)

MARKED = "# T\n\n<!-- config-reference:start -->\nold\n<!-- config-reference:end -->\nafter\n"


def test_update_docs_missing_or_a_directory(tmp_path, capsys):
    missing = tmp_path / "MISSING.md"
    assert error_line(["config", "--update-docs", str(missing)], capsys) == (
        f"srppo-fast: error: --update-docs: '{missing}' does not exist; give the Markdown file that holds the "
        "config-reference markers (docs/config.md).")
    assert error_line(["config", "--update-docs", str(tmp_path)], capsys) == (
        f"srppo-fast: error: --update-docs: '{tmp_path}' is a directory; give the Markdown file that holds the "
        "config-reference markers (docs/config.md).")


def test_update_docs_markers_missing_or_reversed(tmp_path, capsys):
    page = write(tmp_path / "config.md", "<!-- config-reference:end -->\n<!-- config-reference:start -->\n")
    assert error_line(["config", "--update-docs", str(page)], capsys).startswith(
        f"srppo-fast: error: --update-docs: '{page}' has no <!-- config-reference:start --> ... "
        "<!-- config-reference:end --> markers (start before end)")


def test_update_docs_not_utf8(tmp_path, capsys):
    page = write(tmp_path / "config.md", MARKED.encode() + b"caf\xe9\n")
    assert error_line(["config", "--update-docs", str(page)], capsys) == (
        f"srppo-fast: error: --update-docs: '{page}' is not UTF-8 text (byte 0xe9 at offset 80, line 7); save "
        "it as UTF-8.")


def test_update_docs_unreadable(tmp_path, capsys, monkeypatch):
    page = write(tmp_path / "config.md", MARKED)
    make_unreadable(monkeypatch, srppo_fast.io, page)
    assert error_line(["config", "--update-docs", str(page)], capsys) == (
        f"srppo-fast: error: --update-docs: '{page}' cannot be read (Permission denied); check its permissions.")


def test_update_docs_unwritable(tmp_path, capsys, monkeypatch):
    import srppo_fast.io

    page = write(tmp_path / "config.md", MARKED)
    if ROOT:  # the temporary file beside the page cannot be created, as in a read-only directory
        def denied(path, text):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / ".config.md.x.tmp"))
        monkeypatch.setattr(srppo_fast.io, "atomic_write_text", denied)
    else:
        tmp_path.chmod(0o555)
    try:
        line = error_line(["config", "--update-docs", str(page)], capsys)
    finally:
        tmp_path.chmod(0o755)
    assert line.startswith(f"srppo-fast: error: --update-docs: cannot write '{page}' (Permission denied: ")
    assert line.endswith("check that this user may write it and create files in its directory.")
    assert page.read_text() == MARKED


def test_update_docs_works(tmp_path, capsys):
    page = write(tmp_path / "config.md", MARKED)
    assert main(["config", "--update-docs", str(page)]) == 0
    text = page.read_text()
    assert "| key | type | default | meaning |" in text and "\nold\n" not in text and text.endswith("end -->\nafter\n")


# ---------------------------------------------------------------------------------------------
# E. main(): the last resort for OS and decoding errors; bugs keep their traceback


def raising(exc):
    def handler(args):
        raise exc
    return handler


@pytest.mark.parametrize("exc,message", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x.jsonl"),
     "cannot read or write /data/x.jsonl: Permission denied; check the path and its permissions."),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a/tmp", None, "/b/ckpt"),
     "cannot read or write /a/tmp -> /b/ckpt: Invalid cross-device link; check the path and its permissions."),
    (OSError(errno.ENOSPC, "No space left on device"),
     "No space left on device (OSError); check the paths this command uses and the free disk space."),
    (OSError("Can't load tokenizer for 'x'.\nMake sure that:\n- 'x' is a correct model identifier"),
     "Can't load tokenizer for 'x'. Make sure that: - 'x' is a correct model identifier (OSError); check the paths "
     "this command uses and the free disk space."),
    (UnicodeDecodeError("utf-8", b"ok \xff", 3, 4, "invalid start byte"),
     "a file is not utf-8 text (byte 0xff at offset 3: invalid start byte); save the inputs (config, data, "
     "docs/config.md) as UTF-8."),
], ids=["permission", "rename", "no_space", "library_message", "unicode"])
def test_main_turns_os_and_decode_errors_into_one_line(capsys, monkeypatch, tmp_path, exc, message):
    monkeypatch.setattr(cli, "cmd_report", raising(exc))
    assert error_line(["report", str(tmp_path)], capsys) == f"srppo-fast: error: {message}"


def test_main_os_error_from_a_real_command(tmp_path, capsys):
    """`world --out` below a file: whatever the command makes of it, one line naming the path."""
    (tmp_path / "afile").write_text("x")
    line = error_line(["world", "--out", str(tmp_path / "afile" / "world"), "world.num_corpus_docs=300"], capsys)
    assert str(tmp_path / "afile") in line


def test_main_keeps_tracebacks_for_bugs_and_the_other_exits(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "cmd_report", raising(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["report", str(tmp_path)])
    monkeypatch.setattr(cli, "cmd_report", raising(KeyboardInterrupt()))
    assert main(["report", str(tmp_path)]) == 130
    assert capsys.readouterr().err.startswith("srppo-fast: interrupted by SIGINT outside a training loop")


@pytest.mark.parametrize("args,path", [(["report", "{tmp}/nope"], "{tmp}/nope"),
                                        (["config", "--update-docs", "{tmp}/MISSING.md"], "{tmp}/MISSING.md")],
                         ids=["report", "config"])
def test_installed_script_prints_one_line(tmp_path, args, path):
    script = Path(sys.executable).parent / "srppo-fast"
    if not script.exists():
        (pytest.fail if IN_CI else pytest.skip)("the srppo-fast script is not installed beside this Python")
    proc = subprocess.run([str(script), *(a.format(tmp=tmp_path) for a in args)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("srppo-fast: error: ") and path.format(tmp=tmp_path) in err[0]
