"""LoRA roles (model.lora) against full weights: a whole recipe run both ways on this machine, through the CLI.

Per variant: peak resident memory of the run's process (os.wait4's ru_maxrss), wall time, the median SFT step
(tokens / tokens_per_s of its rows), the median SRPPO step and its parts (generate, score, update: metrics.jsonl's
time/*), and the eval table (eval.json: accuracy, answers that end, log-likelihood per token, both splits).

    .venv/bin/python benchmarks/lora_vs_full.py smollm2 [--out benchmarks/results/lora_vs_full_cpu.csv]
    .venv/bin/python benchmarks/lora_vs_full.py smollm2-gae [--out ...]
    .venv/bin/python benchmarks/lora_vs_full.py quickstart [--out ...]

smollm2: configs/smollm2_135m.yaml as docs/own-model.md runs it (SFT 16 steps, SRPPO 8 steps of 8 prompts x 4
samples, 50 + 50 eval prompts), full weights, then with rank-16 adapters on all linear layers. The LoRA variants
take 10x the full-weight learning rates (the usual LoRA practice; not tuned here).
smollm2-gae: the same SFT, then 4 SRPPO steps with a critic (GAE): actor, critic, pi_SFT and pi_PT at once, the
paper's four roles (no eval), with 1024-token micro-batches so that the models, not the activations, dominate the
peak (at 4096 tokens the activations through 30 layers take ~4 GB in fp32 either way).
quickstart: configs/quickstart.yaml (the embedded world's 0.89M-parameter model); the LoRA run reuses the full
run's pretrained base (`pretrain` trains full weights either way: its fingerprint is the same), so its peak
memory and wall time cover the stages after it. Rows are appended to --out (default: printed only); each row
names the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_rows, cpu_model  # noqa: E402

RECIPES = {
    "smollm2": {
        "config": "configs/smollm2_135m.yaml",
        "common": ["srppo.max_steps=8", "srppo.prompts_per_step=8", "srppo.ppo.train_batch_size=32",
                   "world.num_eval=50", "runtime.progress=false"],
        "variants": {"full": [],
                     "lora": ["model.lora.rank=16", "model.lora.alpha=32", "model.lora.target_modules=[all-linear]",
                              "sft.optim.lr=1e-3", "srppo.optim.lr=1e-5"]},
        "reuse": None,
    },
    # the same SFT, then SRPPO with a critic (GAE): the four roles of the paper's setting, no eval
    "smollm2-gae": {
        "config": "configs/smollm2_135m.yaml",
        "common": ["stages=[sft,srppo]", "srppo.max_steps=4", "srppo.prompts_per_step=8",
                   "srppo.ppo.train_batch_size=32", "srppo.advantage.estimator=gae", "srppo.critic.warmup_buffers=1",
                   "srppo.critic.init=sft", "srppo.ppo.micro_batch_tokens=1024", "runtime.progress=false"],
        "variants": {"full": [],
                     "lora": ["model.lora.rank=16", "model.lora.alpha=32", "model.lora.target_modules=[all-linear]",
                              "sft.optim.lr=1e-3", "srppo.optim.lr=1e-5", "srppo.critic.optim.lr=1e-4"]},
        "reuse": None,
    },
    "quickstart": {
        "config": "configs/quickstart.yaml",
        "common": ["runtime.progress=false"],
        "variants": {"full": [],
                     "lora": ["model.lora.rank=8", "model.lora.alpha=16", "model.lora.target_modules=[all-linear]",
                              "sft.optim.lr=1e-3", "sft_extended.optim.lr=1e-3", "spin.optim.lr=1e-4",
                              "srppo.optim.lr=2e-4", "srppo.critic.optim.lr=1e-3"]},
        "reuse": "pretrain",
    },
}


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores"


def run(config: str, out: Path, overrides: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS GB, return code) of one `srppo-fast train`."""
    cmd = [sys.executable, "-m", "srppo_fast", "train", "--config", str(ROOT / config), f"output_dir={out}",
           *overrides]
    started = time.perf_counter()
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    return time.perf_counter() - started, usage.ru_maxrss / 2**20, proc.returncode  # KB -> GB


def summarise(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sft = [r["tokens"] / r["tokens_per_s"] for r in rows if r.get("stage") == "sft" and r.get("tokens_per_s")]
    rl = [r for r in rows if r.get("stage") == "srppo" and "time/step" in r]

    def med(key):
        values = [r[key] for r in rl if key in r]
        return round(statistics.median(values), 3) if values else ""

    return {"sft_step_s": round(statistics.median(sft), 3) if sft else "", "srppo_step_s": med("time/step"),
            "srppo_generate_s": med("time/generate"), "srppo_score_s": med("time/score"),
            "srppo_update_s": med("time/update")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", choices=sorted(RECIPES))
    p.add_argument("--work", default="/tmp/srppo-lora-vs-full", help="where the runs are written")
    p.add_argument("--out", help="CSV to append the rows to (default: print only)")
    p.add_argument("--variants", default="full,lora")
    args = p.parse_args()
    recipe = RECIPES[args.recipe]
    work = Path(args.work) / args.recipe
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    first = None
    for variant in args.variants.split(","):
        out = work / variant
        if recipe["reuse"] and first is not None:  # the full run's pretrained base and world
            (out / "checkpoints").mkdir(parents=True)
            shutil.copytree(first / "world", out / "world")
            shutil.copytree(first / "checkpoints" / recipe["reuse"], out / "checkpoints" / recipe["reuse"])
        wall, rss, code = run(recipe["config"], out, [*recipe["common"], *recipe["variants"][variant]])
        if code != 0:
            raise SystemExit(f"{variant}: exit {code}; see {out}.log")
        first = first or out
        timing = summarise(out)
        evals = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {"(no eval)": {}}
        for model, splits in evals.items():
            row = {"machine": machine(), "recipe": args.recipe, "variant": variant,
                   "overrides": " ".join(recipe["variants"][variant]), "wall_min": round(wall / 60, 2),
                   "peak_rss_gb": round(rss, 2), **timing, "model": model}
            for split, m in splits.items():
                short = split.split(":")[-1]
                row.update({f"{short}_accuracy": m.get("accuracy", ""), f"{short}_eos_rate": m.get("eos_rate", ""),
                            f"{short}_loglik": round(m["loglik"], 4) if "loglik" in m else ""})
            rows.append(row)
            print(row, flush=True)
    if args.out:
        append_rows(Path(args.out), rows, list(dict.fromkeys(k for r in rows for k in r)))


if __name__ == "__main__":
    main()
