"""`srppo-fast report OUTPUT_DIR`: training curves from metrics.jsonl as PNG files in OUTPUT_DIR/report/.

One figure per stage: language-modelling stages plot the training and held-out loss; SPIN its DPO loss,
implicit rewards, shares and log-probs; RL stages plot
the rewards (coherent or model, KL part, total), the KL, the sample accuracy and careful share where a
verifier exists (with the greedy eval accuracy when logged), and the response length and EOS rate.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable

from .errors import SrppoError
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


def _figure(stage: str, rows: list[dict], panels: list, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, [k for k in keys if _series(rows, k)[0]]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            xs, ys = _series(rows, key)
            ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(stage)
    fig.tight_layout()
    path = out / (re.sub(r"[^\w.-]", "_", stage) + ".png")  # a stage name is never a path
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _stderr_warning(message: str) -> None:
    print(f"srppo-fast: warning: {message}", file=sys.stderr)


def make_report(output_dir: str | os.PathLike, warn: Callable[[str], None] = _stderr_warning) -> list[Path]:
    """Write one PNG per stage found in output_dir/metrics.jsonl; returns their paths.

    A last line cut short (a run killed mid-write) is skipped and `warn` is told, naming file:line. Everything
    else raises SrppoError naming the path: no such run directory, no metrics.jsonl or an empty one, a
    malformed line or a row without "stage" (error, not skip: srppo-fast writes "stage" into every row, so
    such a row means the file was edited or is not a metrics log, and its curves cannot be trusted), a
    report path that is not a directory, a file that cannot be read or written."""
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
    written = []
    try:
        out.mkdir(exist_ok=True)
        for stage in dict.fromkeys(r["stage"] for r in rows):
            stage_rows = [r for r in rows if r["stage"] == stage and isinstance(r.get("step"), (int, float))]
            panels = RL_PANELS if any("reward/total" in r for r in stage_rows) else \
                SPIN_PANELS if any("rewards/margin" in r for r in stage_rows) else LM_PANELS
            path = _figure(stage, stage_rows, panels, out)
            if path is not None:
                written.append(path)
    except OSError as e:
        raise SrppoError(f"cannot write {e.filename or out}: {e.strerror or e}; check the permissions of {out}.") \
            from None
    if not written:
        raise SrppoError(f"{metrics}: none of its {len(rows)} rows has a step and a plotted value (loss, reward, "
                         "...); nothing to draw yet.")
    return written
