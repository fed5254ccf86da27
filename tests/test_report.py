"""`srppo-fast report` writes report/index.html: one self-contained page (curves, eval table, samples, config)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from srppo_fast.errors import SrppoError
from srppo_fast.report import make_report

from .helpers import require

require("matplotlib")

XSS = "<script>alert(1)</script>"
PWN = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"
CONFIG = "# written by srppo-fast\nstages: [sft, srppo, eval]\nsrppo:\n  kl_coef: 0.05  # <b>not bold</b>\n"


def metrics_rows() -> list[dict]:
    rows = [{"stage": "sft", "step": s, "loss": 3.0 / s, "eval_loss": 3.2 / s, "lr": 1e-4 * s} for s in range(1, 6)]
    rows += [{"stage": "srppo", "step": s, "reward/coherent": 0.1 * s, "reward/kl": -0.01 * s, "reward/total": 0.09 * s,
              "kl": 0.2 * s, "sample/accuracy": 0.3 + 0.05 * s, "response_length": 40 - s, "eos_rate": 0.8}
             for s in range(1, 6)]
    rows += [{"stage": "eval", "model": m, "split": sp, "accuracy": a, "careful_rate": 0.25, "nll": 1.5, "time": 3.0}
             for m, a in (("sft", 0.5), ("srppo", 0.625)) for sp in ("eval_id", "eval_ood")]
    return rows


def sample_rows() -> list[dict]:
    rows = []
    for i in range(10):
        rows.append({"stage": "srppo", "step": 5 * (i // 3 + 1), "pick": ["highest", "lowest", "random"][i % 3],
                     "prompt": f"Q{i}: what is {i} + {i}?\n(show your work)", "response": f"answer {2 * i} " * 30,
                     "reward": round(1.0 - 0.17 * i, 3), "log_ratio_sum": -0.5 * i, "log_ratio_max": 0.1 * i,
                     "log_ratio_max_token": " the", "log_ratio_max_pos": i, "kl": 0.01 * (10 - i),
                     "correct": [True, False, None][i % 3], "length": 30 + i, "ended": i % 2 == 0})
    rows[3]["response"] = XSS
    rows[4]["prompt"] = PWN
    return rows


def lines(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A hand-made run (sft + srppo curves, eval rows, samples, config) and its report: (run, paths, html)."""
    run = tmp_path_factory.mktemp("runs") / "my-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(lines(metrics_rows()))
    (run / "samples.jsonl").write_text(lines(sample_rows()))
    (run / "config.yaml").write_text(CONFIG)
    paths = make_report(run)
    return run, paths, (run / "report" / "index.html").read_text(encoding="utf-8")


def test_report_html_written_with_the_pngs(report):
    run, paths, _ = report
    assert paths == [run / "report" / "sft.png", run / "report" / "srppo.png", run / "report" / "index.html"]
    assert not [p for p in (run / "report").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_report_html_is_self_contained_and_escaped(report):
    run, _, page = report
    assert page.startswith("<!DOCTYPE html>")
    for external in ('src="http', "src=http", 'href="http', "href=http", "<link", "url(", "@import"):
        assert external not in page
    assert len(re.findall(r'<img class=plot [^>]*src="data:image/png;base64,', page)) == 2  # sft, srppo
    for text in ("my-run", "sft, srppo, eval", "<h3>sft</h3>", "<h3>srppo</h3>", "Evaluation", "config.yaml"):
        assert text in page
    assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert PWN not in page and "&lt;img src=x onerror=" in page
    assert "<b>not bold</b>" not in page and "&lt;b&gt;not bold&lt;/b&gt;" in page
    assert len(re.findall(r"<tr data-stage=", page)) == 10
    table = page[page.index("<section id=eval>"):page.index("<section id=samples>")]
    assert "<th>accuracy</th><th>careful_rate</th><th>nll</th>" in table and "<th>time</th>" not in table
    assert table.count("<tr><td>") == 4 and "<td class=n>0.625</td>" in table


def test_report_html_only_metrics(tmp_path):
    """No samples, no eval, no config: a valid page all the same, with a one-line note for the samples."""
    (tmp_path / "metrics.jsonl").write_text(lines(metrics_rows()[:5]))
    paths = make_report(tmp_path)
    assert paths == [tmp_path / "report" / "sft.png", tmp_path / "report" / "index.html"]
    page = paths[-1].read_text()
    assert "No samples logged" in page and "<section id=eval>" not in page and "<details>" not in page
    assert "<table id=sample-table>" not in page and page.rstrip().endswith("</html>")


def test_report_html_eval_from_eval_md(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(lines(metrics_rows()[:5]))
    (tmp_path / "eval.md").write_text("| model | eval_id accuracy |\n|---|---|\n| sft <1> | 0.500 |\n")
    page = make_report(tmp_path)[-1].read_text()
    assert "<p class=note>from eval.md</p>" in page and "<th>eval_id accuracy</th>" in page
    assert "<td>sft &lt;1&gt;</td><td>0.500</td>" in page and "---" not in page


def test_report_samples_truncated_tail_warns_bad_line_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(lines(metrics_rows()[:5]))
    (tmp_path / "samples.jsonl").write_text(lines(sample_rows()[:2]) + '{"stage": "srppo", "st')
    warnings = []
    page = make_report(tmp_path, warn=warnings.append)[-1].read_text()
    assert len(warnings) == 1 and warnings[0].startswith(f"{tmp_path / 'samples.jsonl'}:3: skipped the last line")
    assert len(re.findall(r"<tr data-stage=", page)) == 2
    (tmp_path / "samples.jsonl").write_text(lines(sample_rows()[:1]) + '{"stage": "srppo"}\n')
    with pytest.raises(SrppoError, match=re.escape(f"{tmp_path / 'samples.jsonl'}:2: a row without 'step'")):
        make_report(tmp_path)


def chromium() -> list[str]:
    """The headless browser command line, or a skip (a failure where SRPPO_FAST_REQUIRE_BROWSER=1, as in CI)."""
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            extra = [] if "headless-shell" in Path(exe).name else ["--headless=new"]
            return [exe, *extra, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2000"]
    if os.environ.get("SRPPO_FAST_REQUIRE_BROWSER") == "1":
        pytest.fail("SRPPO_FAST_REQUIRE_BROWSER=1 but no headless Chromium on PATH: apt-get install "
                    "chromium-headless-shell")
    pytest.skip("no headless Chromium: apt-get install chromium-headless-shell")


def browse(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([*args, f"--user-data-dir={tmp_path / 'profile'}"], capture_output=True, timeout=60,
                          text=True)
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def test_report_html_in_a_browser(report, tmp_path):
    """Chromium renders the page (not blank), its script ran: both plots loaded, every sample row, no injection."""
    from PIL import Image

    run, _, _ = report
    cmd, url = chromium(), (run / "report" / "index.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    proc = browse([*cmd, f"--screenshot={shot}", url], tmp_path)
    assert shot.is_file(), f"no screenshot written:\n{proc.stderr[-3000:]}"
    with Image.open(shot) as img:
        assert img.size == (1200, 2000)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 24)
    top = max(n for n, _ in colours)
    assert len(colours) > 200 and top < 0.99 * 1200 * 2000, f"a blank page? {len(colours)} colours"
    if os.environ.get("SRPPO_FAST_KEEP_SHOT"):
        shutil.copy(shot, os.environ["SRPPO_FAST_KEEP_SHOT"])

    dom = browse([*cmd, "--virtual-time-budget=5000", "--dump-dom", url], tmp_path).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:2000]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    assert attrs.get("data-ready") == "1", body.group(0)
    assert attrs.get("data-plots") == "2" and attrs.get("data-sample-rows") == "10", body.group(0)
    assert "data-pwned" not in attrs
    assert "10 of 10 samples" in dom  # the filter ran once
