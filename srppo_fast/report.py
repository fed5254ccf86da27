"""`srppo-fast report OUTPUT_DIR`: training curves from metrics.jsonl as PNG files in OUTPUT_DIR/report/, and
OUTPUT_DIR/report/index.html, one self-contained page (no server, no network) to open from disk or attach to an email.

One figure per stage: language-modelling stages plot the training and held-out loss; SPIN its DPO loss,
implicit rewards, shares and log-probs; RL stages plot
the rewards (coherent or model, KL part, total), the KL, the sample accuracy and careful share where a
verifier exists (with the greedy eval accuracy when logged), and the response length and EOS rate.

index.html holds those figures (the PNGs inlined as data: URIs), the evaluation table (the eval rows of
metrics.jsonl, else eval.md), the samples of samples.jsonl in a table to filter and sort (inline JavaScript,
every model output HTML-escaped; a Content-Security-Policy runs only the page's own script) and config.yaml.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import io
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import SrppoError
from .io import atomic_file, atomic_write_text, read_text_file
from .metrics import read_metrics

RL_PANELS = [
    ("reward", ["reward/coherent", "reward/model", "reward/kl", "reward/total"]),
    ("KL(pi || ref), nats per response", ["kl"]),
    ("accuracy", ["sample/accuracy", "sample/careful_rate", "eval/eval_id/accuracy", "eval/eval_ood/accuracy"]),
    ("response", ["response_length", "eos_rate"]),
]
LM_PANELS = [("loss", ["loss", "eval_loss"]), ("lr", ["lr"])]
SPIN_PANELS = [("DPO loss", ["loss"]), ("implicit reward (beta-scaled log-ratio)", ["rewards/margin", "rewards/chosen",
                                                                                  "rewards/rejected"]),
               ("share", ["rewards/accuracy", "spin/identical_fraction", "spin/sample_accuracy"]),
               ("summed log-prob", ["logps/chosen", "logps/rejected"])]


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _draw(stage: str, rows: list[dict], panels: list):
    """The stage's figure, its panels two to a row (it fits a 1200-pixel page at full size); None when no panel
    has a value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, [k for k in keys if _series(rows, k)[0]]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return None
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            xs, ys = _series(rows, key)
            ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(stage)
    fig.tight_layout()
    return fig


def _figure(stage: str, rows: list[dict], panels: list, out: Path) -> tuple[Path, bytes] | None:
    """The stage's PNG, drawn once: written to out/<stage>.png and returned for index.html."""
    import matplotlib.pyplot as plt

    fig = _draw(stage, rows, panels)
    if fig is None:
        return None
    path = out / (re.sub(r"[^\w.-]", "_", stage) + ".png")  # a stage name is never a path
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    png = buffer.getvalue()
    with atomic_file(path, "wb") as fh:  # a kill or a full disk leaves the previous figure, never a cut one
        fh.write(png)
    return path, png


# ---------------------------------------------------------------------------------------------
# index.html: one file, everything inline; every value from the run goes through html.escape

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1d1d1f;max-width:1160px;margin:0 auto;
padding:8px 16px 40px}
h1{font-size:22px;margin:12px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:16px 0 6px}.meta{color:#555;margin:2px 0}nav a{margin-right:14px}
.fig{overflow-x:auto}img.plot{display:block;max-width:100%;height:auto;border:1px solid #e3e3e3;cursor:zoom-in}
img.plot.full{max-width:none;cursor:zoom-out}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #d4d4d4;padding:3px 6px;vertical-align:top}
th{background:#f4f4f6;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
#sample-table{width:100%;table-layout:fixed}#sample-table th[data-kind]{cursor:pointer;user-select:none}
.w-stage{width:4.5em}.w-step{width:3.6em}.w-pick{width:4.6em}.w-reward,.w-kl,.w-log_ratio_sum,.w-length{width:5em}
.w-log_ratio_max{width:7.5em}.w-correct{width:4.2em}.w-ended{width:4em}
#sample-table th.asc::after{content:' \\25B2'}#sample-table th.desc::after{content:' \\25BC'}
.txt{white-space:pre-wrap;overflow-wrap:anywhere;max-height:13em;overflow-y:auto;margin:0;
font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
.p{color:#555;background:#f7f7f9;padding:2px 4px;margin-bottom:3px}.r{padding:2px 4px}
.tok{display:block;color:#666;font-size:11px;overflow-wrap:anywhere}
.filters{display:flex;flex-wrap:wrap;gap:10px;align-items:center;margin:6px 0}
.filters input[type=search]{width:260px}.note{color:#666;font-style:italic}
details pre{background:#f7f7f9;padding:8px;overflow-x:auto;font-size:12px}
"""

_JS = """(function(){
var body=document.body,table=document.getElementById('sample-table'),rows=[],texts=[];
function $(id){return document.getElementById(id);}
if(table){
  rows=Array.prototype.slice.call(table.tBodies[0].rows);
  texts=rows.map(function(r){return Array.prototype.map.call(r.querySelectorAll('.txt'),
    function(e){return e.textContent;}).join('\\n').toLowerCase();});
  var apply=function(){
    var st=$('f-stage').value,sp=$('f-step').value,pk=$('f-pick').value,q=$('f-text').value.toLowerCase(),n=0;
    rows.forEach(function(r,i){
      var ok=(!st||r.dataset.stage===st)&&(!sp||r.dataset.step===sp)&&(!pk||r.dataset.pick===pk)
        &&(!q||texts[i].indexOf(q)>=0);
      r.hidden=!ok;if(ok)n++;});
    $('f-count').textContent=n+' of '+rows.length+' samples';};
  ['f-stage','f-step','f-pick','f-text'].forEach(function(id){$(id).addEventListener('input',apply);});
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th){
    if(!th.dataset.kind)return;
    th.addEventListener('click',function(){
      var col=th.cellIndex,num=th.dataset.kind==='num',dir=th.classList.contains('asc')?-1:1;
      Array.prototype.forEach.call(th.parentNode.cells,function(c){c.classList.remove('asc','desc');});
      th.classList.add(dir>0?'asc':'desc');
      var key=function(r){var c=r.cells[col];return num?parseFloat(c.dataset.v):c.textContent;};
      var order=rows.map(function(r,i){return [key(r),i,r];});
      order.sort(function(a,b){
        var x=a[0],y=b[0];
        if(num){var nx=isNaN(x),ny=isNaN(y);if(nx||ny)return nx===ny?a[1]-b[1]:(nx?1:-1);}
        return x<y?-dir:x>y?dir:a[1]-b[1];});
      order.forEach(function(o){table.tBodies[0].appendChild(o[2]);});});});
  apply();}
Array.prototype.forEach.call(document.querySelectorAll('img.plot'),function(img){
  img.addEventListener('click',function(){img.classList.toggle('full');});});
window.addEventListener('load',function(){
  var ok=Array.prototype.filter.call(document.querySelectorAll('img.plot'),function(i){
    return i.complete&&i.naturalWidth>0&&i.naturalHeight>0;}).length;
  body.setAttribute('data-plots',String(ok));
  body.setAttribute('data-sample-rows',String(rows.length));
  body.setAttribute('data-ready','1');});
})();"""

_SAMPLE_NUMBERS = [("reward", "reward"), ("kl", "KL"), ("log_ratio_sum", "Σ log-ratio"),
                   ("log_ratio_max", "max log-ratio"), ("length", "length")]


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "–"}[value]
    if isinstance(value, float):
        return f"{value + 0.0:.4g}"  # no "-0"
    return _e(value)


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _eval_rows(rows: list[dict]) -> list[dict]:
    """Rows an eval stage logs: a model and a split, no step."""
    return [r for r in rows if "step" not in r and "model" in r and "split" in r]


def _eval_html(rows: list[dict], eval_md: str | None) -> str | None:
    if rows:
        stages = list(dict.fromkeys(r["stage"] for r in rows))
        keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("stage", "model", "split", "time")))
        head = (["stage"] if len(stages) > 1 else []) + ["model", "split"] + keys
        body = []
        for r in rows:
            cells = ([f"<td>{_e(r['stage'])}</td>"] if len(stages) > 1 else []) + \
                [f"<td>{_e(r['model'])}</td>", f"<td>{_e(r['split'])}</td>"] + \
                [f"<td class=n>{_num(r.get(k))}</td>" for k in keys]
            body.append("<tr>" + "".join(cells) + "</tr>")
        note = "from the eval rows of metrics.jsonl"
    elif eval_md and eval_md.lstrip().startswith("|"):  # a markdown table: header, |---| line, rows
        lines = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in eval_md.splitlines() if ln.strip()]
        head = lines[0]
        body = ["<tr>" + "".join(f"<td>{_e(c)}</td>" for c in ln) + "</tr>" for ln in lines[1:]
                if not all(set(c) <= set("-: ") for c in ln)]
        note = "from eval.md"
    elif eval_md:
        return f"<p class=note>from eval.md</p><pre>{_e(eval_md)}</pre>"
    else:
        return None
    return (f"<p class=note>{note}</p><table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) +
            "</tr></thead><tbody>" + "\n".join(body) + "</tbody></table>")


def _options(id_: str, label: str, values) -> str:
    opts = "".join(f"<option value=\"{_e(v)}\">{_e(v)}</option>" for v in values)
    return f"<label>{label} <select id={id_}><option value=\"\">all</option>{opts}</select></label>"


def _samples_html(samples: list[dict]) -> str:
    # a reward-model stage logs no log-ratios: columns with no value at all go
    numbers = [(k, h) for k, h in _SAMPLE_NUMBERS if any(s.get(k) is not None for s in samples)]
    head = [("stage", "text", "stage"), ("step", "num", "step"), ("pick", "text", "pick")]
    head += [(k, "num", h) for k, h in numbers] + [("correct", "text", "correct"), ("ended", "text", "ended")]
    head = [f"<th class=w-{k} data-kind={kind}>{_e(h)}</th>" for k, kind, h in head] + ["<th>prompt / response</th>"]
    body = []
    for s in samples:
        cells = [f"<td>{_e(s['stage'])}</td>", f"<td class=n data-v={_e(s['step'])}>{_e(s['step'])}</td>",
                 f"<td>{_e(s.get('pick', ''))}</td>"]
        for k, _ in numbers:
            v = s.get(k)
            tok = s.get("log_ratio_max_token") if k == "log_ratio_max" else None
            tok = "" if tok is None else \
                f"<span class=tok>{_e(json.dumps(tok))} @{_e(s.get('log_ratio_max_pos'))}</span>"
            sort = v if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td class=n data-v=\"{sort}\">{_num(v)}{tok}</td>")
        cells += [f"<td>{_num(s.get('correct'))}</td>", f"<td>{_num(s.get('ended'))}</td>",
                  f"<td><div class='txt p'>{_e(s.get('prompt', ''))}</div>"
                  f"<div class='txt r'>{_e(s.get('response', ''))}</div></td>"]
        body.append(f"<tr data-stage=\"{_e(s['stage'])}\" data-step=\"{_e(s['step'])}\" "
                    f"data-pick=\"{_e(s.get('pick', ''))}\">" + "".join(cells) + "</tr>")
    filters = (_options("f-stage", "stage", dict.fromkeys(s["stage"] for s in samples)) +
               _options("f-step", "step", sorted({s["step"] for s in samples})) +
               _options("f-pick", "pick", dict.fromkeys(s.get("pick", "") for s in samples)) +
               "<label>text <input type=search id=f-text placeholder='filter prompt / response'></label>"
               "<span id=f-count class=note></span>")
    return (f"<div class=filters>{filters}</div><p class=note>Click a column header to sort; long texts scroll "
            "inside their cell.</p><table id=sample-table><thead><tr>" + "".join(head) + "</tr></thead><tbody>\n" +
            "\n".join(body) + "</tbody></table>")


def _page(run: Path, stages: list[str], figures: list[tuple[str, bytes]], eval_html: str | None,
          samples_html: str, config: str | None) -> str:
    """The whole of index.html."""
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    csp = (f"default-src 'none'; img-src data:; style-src {_sha(_CSS)}; script-src {_sha(_JS)}; "
           "base-uri 'none'; form-action 'none'")
    sections = [("curves", "Training curves", "\n".join(
        f"<h3>{_e(stage)}</h3><div class=fig><img class=plot alt=\"{_e(stage)} curves\" "
        f"src=\"data:image/png;base64,{base64.b64encode(png).decode()}\"></div>" for stage, png in figures))]
    if eval_html is not None:
        sections.append(("eval", "Evaluation", eval_html))
    sections.append(("samples", "Samples", samples_html))
    if config is not None:
        sections.append(("config", "Config", f"<details><summary>config.yaml ({len(config.splitlines())} lines)"
                                             f"</summary><pre>{_e(config)}</pre></details>"))
    nav = "".join(f"<a href=\"#{sid}\">{title}</a>" for sid, title, _ in sections)
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta http-equiv=Content-Security-Policy content=\"{csp}\">"
            "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
            f"<title>srppo-fast report: {_e(run.name)}</title><style>{_CSS}</style></head>\n<body>"
            f"<h1>srppo-fast report: {_e(run.name)}</h1><p class=meta>{_e(run)}</p>"
            f"<p class=meta>stages: {_e(', '.join(stages))}</p><p class=meta>generated {_e(when)}</p>"
            f"<nav>{nav}</nav>\n" +
            "\n".join(f"<section id={sid}><h2>{title}</h2>\n{body}</section>" for sid, title, body in sections) +
            f"\n<script>{_JS}</script></body></html>\n")


def _stderr_warning(message: str) -> None:
    print(f"srppo-fast: warning: {message}", file=sys.stderr)


def make_report(output_dir: str | os.PathLike, warn: Callable[[str], None] = _stderr_warning) -> list[Path]:
    """Write one PNG per stage found in output_dir/metrics.jsonl, then report/index.html; returns their paths.

    A last line cut short (a run killed mid-write) of metrics.jsonl or samples.jsonl is skipped and `warn` is
    told, naming file:line. Everything else raises SrppoError naming the path: no such run directory, no
    metrics.jsonl or an empty one, a malformed line or a row without "stage" (error, not skip: srppo-fast
    writes "stage" into every row, so such a row means the file was edited or is not a metrics log, and its
    curves cannot be trusted), a report path that is not a directory, a file that cannot be read or written."""
    run = Path(output_dir)
    if not run.is_dir():
        what = "is a file, not a directory" if run.exists() else "does not exist"
        raise SrppoError(f"'{run}' {what}; give the output_dir of a run (the directory holding metrics.jsonl).")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        what = "is not a file" if metrics.exists() else "does not exist"
        raise SrppoError(f"{metrics} {what}; give the output_dir of a run that has logged a step "
                         "(srppo-fast report RUN_DIR).")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SrppoError("srppo-fast report needs matplotlib: pip install 'srppo-fast[report]'.") from None
    rows = read_metrics(metrics, require={"stage": str}, on_truncated_tail=warn)
    if not rows:
        raise SrppoError(f"{metrics} has no rows; the run has not logged a step yet: report it once it has.")
    out = run / "report"
    if out.exists() and not out.is_dir():
        raise SrppoError(f"{out} exists and is not a directory; move or delete it, the report is written there.")
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    figures = []
    try:
        out.mkdir(exist_ok=True)
        for stage in stages:
            stage_rows = [r for r in rows if r["stage"] == stage and isinstance(r.get("step"), (int, float))]
            panels = RL_PANELS if any("reward/total" in r for r in stage_rows) else \
                SPIN_PANELS if any("rewards/margin" in r for r in stage_rows) else LM_PANELS
            drawn = _figure(stage, stage_rows, panels, out)
            if drawn is not None:
                figures.append((stage, *drawn))
        if not figures:
            raise SrppoError(f"{metrics}: none of its {len(rows)} rows has a step and a plotted value (loss, "
                             "reward, ...); nothing to draw yet.")
        samples_path, eval_md, config = run / "samples.jsonl", run / "eval.md", run / "config.yaml"
        if samples_path.is_file():
            samples = read_metrics(samples_path, require={"stage": str, "step": int}, on_truncated_tail=warn)
            samples_html = _samples_html(samples) if samples else "<p class=note>samples.jsonl has no rows.</p>"
        else:
            samples_html = "<p class=note>No samples logged (no samples.jsonl: RL stages write it).</p>"
        fix = "repair or delete it, or report without it by moving it aside."
        eval_text = read_text_file(eval_md, "eval table", fix) if eval_md.is_file() else None
        config_text = read_text_file(config, "config", fix) if config.is_file() else None
        page = _page(run.resolve(), stages, [(stage, png) for stage, _, png in figures],
                     _eval_html(_eval_rows(rows), eval_text), samples_html, config_text)
        index = out / "index.html"
        atomic_write_text(index, page)
    except OSError as e:
        raise SrppoError(f"cannot write {e.filename or out}: {e.strerror or e}; check the permissions of {out}.") \
            from None
    return [path for _, path, _ in figures] + [index]
