"""Table 1 over several draws: the quickstart's stages run once per seed, and the spread of the eval table.

    python benchmarks/table1.py [--config configs/quickstart.yaml] [--seeds 3] [--out-dir runs/table1]
        [--csv benchmarks/results/table1.csv] [--md benchmarks/results/table1.md] [--threads T] [key=value ...]

Draw k (k = 0..N-1) runs `python -m srppo_fast train --config CONFIG output_dir=OUT_DIR/draw{k} seed={1+k}
world.seed={k} [runtime.num_threads=T] [key=value ...]`, its output to OUT_DIR/draw{k}/table1.log; draw 0 is
the quickstart's own config. `seed` seeds model init, data order and sampling of every stage; `world.seed`
the generated world. Every draw is run again on each invocation: the trainer skips its completed stages, so
an interrupted command resumes where it stopped.

CSV (rewritten whole, never appended): one row per (draw, model, split) with columns COLUMNS, the models in
eval.json's order and labelled as in the eval table (srppo_fast.config.stage_label); then per (model, split) a
row with draw = 'mean' and one with draw = 'se' (standard error: sample std (ddof=1) / sqrt(n); empty for one
draw), seed and world_seed empty. machine: the CPU model; gpu: the CUDA device present, if any; threads: --threads
or torch's default; git_sha: benchmarks.common.git_sha (SRPPO_FAST_GIT_SHA, else HEAD, '-dirty' for a changed
tree, else 'unknown'). wall_s is the draw's wall-clock seconds: the train commands that trained a stage of it,
summed (kept in OUT_DIR/draw{k}/table1.json; the eval stage re-runs on every invocation, and one that trains
nothing adds nothing).

Markdown: a header line (machine, draws, git SHA, date), a table of `mean ± se` per model for accuracy,
careful share and reference log-likelihood per token on eval_id (in-domain) and eval_ood (out-of-domain),
and a table of each draw's in-domain / out-of-domain accuracy per model. It is also printed to stdout.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import RESULTS, cpu_model, git_sha  # noqa: E402
from srppo_fast.config import stage_label  # noqa: E402
from srppo_fast.io import atomic_write_text  # noqa: E402

METRICS = ("accuracy", "careful_rate", "loglik")
SPLITS = {"eval_id": "in-domain", "eval_ood": "out-of-domain"}
MD_METRICS = {"accuracy": "accuracy", "careful_rate": "careful share", "loglik": "loglik/token"}
COLUMNS = ["timestamp", "git_sha", "machine", "gpu", "threads", "draw", "seed", "world_seed", "model", "split",
           *METRICS, "wall_s"]
RESERVED = ("output_dir", "seed", "world.seed", "runtime.num_threads")  # set per draw by this script


class Stat(NamedTuple):
    mean: float
    se: float | None  # None for a single value
    n: int


def mean_se(values: list[float]) -> Stat:
    """Mean and standard error (sample std with ddof=1 over sqrt(n)) of one metric over the draws."""
    n = len(values)
    return Stat(statistics.fmean(values), statistics.stdev(values) / math.sqrt(n) if n > 1 else None, n)


def summarize(results: list[dict]) -> dict[str, dict[str, dict[str, Stat]]]:
    """model -> split -> metric -> Stat over the draws that report it; models and splits in order of appearance.

    Each result is one draw: {"draw", "seed", "world_seed", "wall_s", "eval": the draw's eval.json}."""
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in results:
        for model, splits in r["eval"].items():
            for split, row in splits.items():
                per_metric = values.setdefault(model, {}).setdefault(split, {})
                for metric in METRICS:
                    if row.get(metric) is not None:
                        per_metric.setdefault(metric, []).append(float(row[metric]))
    return {model: {split: {m: mean_se(v) for m, v in metrics.items()} for split, metrics in splits.items()}
            for model, splits in values.items()}


def csv_rows(results: list[dict], summary: dict, meta: dict) -> list[dict]:
    """The CSV's rows: one per (draw, model, split), then 'mean' and 'se' rows per (model, split)."""
    rows = []
    for r in results:
        for model, splits in r["eval"].items():
            for split, row in splits.items():
                rows.append({**meta, "draw": r["draw"], "seed": r["seed"], "world_seed": r["world_seed"],
                             "model": stage_label(model), "split": split,
                             **{m: row.get(m) for m in METRICS}, "wall_s": r["wall_s"]})
    wall = mean_se([r["wall_s"] for r in results])
    for model, splits in summary.items():
        for split, stats in splits.items():
            for kind in ("mean", "se"):
                rows.append({**meta, "draw": kind, "model": stage_label(model), "split": split,
                             **{m: getattr(s, kind) for m, s in stats.items()}, "wall_s": getattr(wall, kind)})
    return rows


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def cell(stat: Stat | None, digits: int) -> str:
    if stat is None:
        return "n/a"
    se = "n/a" if stat.se is None else f"{stat.se:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {se}"


def paired(results: list[dict], model: str, other: str) -> dict[str, Stat]:
    """Per split, `model`'s accuracy minus `other`'s, draw by draw (both trained from the same draw's base and
    world), as mean ± se: the spread the draws share (a weak base pulls every row down) cancels."""
    out = {}
    for split in SPLITS:
        diffs = [r["eval"][model][split]["accuracy"] - r["eval"][other][split]["accuracy"] for r in results
                 if r["eval"].get(model, {}).get(split) and r["eval"].get(other, {}).get(split)]
        if diffs:
            out[split] = mean_se(diffs)
    return out


def markdown(results: list[dict], summary: dict, meta: dict, versus: str = "srppo") -> str:
    """Header line, the `mean ± se` table per model, and each draw's in-domain / out-of-domain accuracy."""
    gpu = f", {meta['gpu']}" if meta["gpu"] else ""
    lines = [f"Table 1 over {len(results)} draw{'s' if len(results) != 1 else ''} on {meta['machine']} "
             f"({meta['threads']} threads{gpu}), git {meta['git_sha']}, {meta['timestamp']}", ""]
    head = ["model"] + [f"{place} {MD_METRICS[m]}" for m in METRICS for place in SPLITS.values()]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, splits in summary.items():
        cells = [cell(splits.get(split, {}).get(m), 4 if m == "loglik" else 3) for m in METRICS for split in SPLITS]
        lines.append("| " + " | ".join([stage_label(model), *cells]) + " |")
    head = ["model"] + [f"draw {r['draw']} (seed {r['seed']}, world {r['world_seed']})" for r in results]
    lines += ["", "Accuracy per draw (in-domain / out-of-domain):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in summary:
        cells = [" / ".join("n/a" if r["eval"].get(model, {}).get(s, {}).get("accuracy") is None
                            else f"{r['eval'][model][s]['accuracy']:.3f}" for s in SPLITS) for r in results]
        lines.append("| " + " | ".join([stage_label(model), *cells]) + " |")
    if versus in summary and len(summary) > 1:
        name = stage_label(versus)
        lines += ["", f"{name} minus each other model, paired by draw (accuracy, mean ± se):", "",
                  f"| {name} minus | in-domain | out-of-domain |", "|---|---|---|"]
        for other in summary:
            if other != versus:
                diff = paired(results, versus, other)
                lines.append(f"| {stage_label(other)} | {cell(diff.get('eval_id'), 3)} | "
                             f"{cell(diff.get('eval_ood'), 3)} |")
    lines += ["", "Wall-clock per draw: " + ", ".join(f"{r['wall_s']:.0f} s" for r in results)]
    return "\n".join(lines) + "\n"


def checkpoints_written(out: Path) -> dict[str, int]:
    """When each stage checkpoint of a run was last saved: unchanged by a run that trained nothing."""
    return {str(p): p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*/srppo_checkpoint.json")}


def run_draw(k: int, config: str, out_dir: Path, threads: int | None, overrides: list[str]) -> dict:
    """Train (or skip through) draw k and read its eval.json; exits with one line when the run fails."""
    out = out_dir / f"draw{k}"
    out.mkdir(parents=True, exist_ok=True)
    evaljson, log_path, record = out / "eval.json", out / "table1.log", out / "table1.json"
    before = checkpoints_written(out)
    argv = [sys.executable, "-m", "srppo_fast", "train", "--config", config, f"output_dir={out}", f"seed={1 + k}",
            f"world.seed={k}"]
    env = dict(os.environ)
    if threads:
        argv.append(f"runtime.num_threads={threads}")
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"table1: draw {k} (seed {1 + k}, world.seed {k}): training, log in {log_path}", file=sys.stderr)
    started, t0 = time.time(), time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(argv + overrides, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    elapsed = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"table1: draw {k} (seed {1 + k}, world.seed {k}) failed with exit code {rc}; see {log_path}")
    if not evaljson.exists() or evaljson.stat().st_mtime < started:
        sys.exit(f"table1: draw {k} finished but did not write {evaljson}; keep the eval stage in `stages` "
                 f"(see {log_path})")
    prior = json.loads(record.read_text())["wall_s"] if before and record.exists() else None
    if prior is not None and checkpoints_written(out) == before:
        wall = prior  # nothing trained, only the eval stage re-ran
    else:
        wall = (prior or 0.0) + elapsed
        atomic_write_text(record, json.dumps({"wall_s": wall}) + "\n")
    print(f"table1: draw {k} done in {elapsed:.0f} s (the draw's total: {wall:.0f} s)", file=sys.stderr)
    return {"draw": k, "seed": 1 + k, "world_seed": k, "wall_s": wall, "eval": json.loads(evaljson.read_text())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"), help="the run's YAML config")
    p.add_argument("--seeds", type=int, default=3, help="number of draws (default 3)")
    p.add_argument("--out-dir", default="runs/table1", help="draw k runs in OUT_DIR/draw{k}")
    p.add_argument("--csv", default=str(RESULTS / "table1.csv"), help="CSV to (re)write")
    p.add_argument("--md", default=str(RESULTS / "table1.md"), help="Markdown to (re)write")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (runtime.num_threads and "
                   "OMP_NUM_THREADS); default: torch's")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="passed on to every run, e.g. srppo.max_steps=2")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    for item in args.overrides:
        if item.split("=", 1)[0].strip() in RESERVED:
            p.error(f"override '{item}': {', '.join(RESERVED)} are set per draw; use --out-dir, --seeds, --threads")
    results = [run_draw(k, args.config, Path(args.out_dir), args.threads, args.overrides) for k in range(args.seeds)]
    meta = {"timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_sha": git_sha(), "machine": cpu_model(), "threads": args.threads or torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else ""}
    summary = summarize(results)
    text = markdown(results, summary, meta)
    for path, content in ((args.csv, to_csv(csv_rows(results, summary, meta))), (args.md, text)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, content)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
