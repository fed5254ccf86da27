"""`srppo-fast report OUTPUT_DIR`: training curves from metrics.jsonl as PNG files in OUTPUT_DIR/report/.

One figure per stage: language-modelling stages plot the training and held-out loss; RL stages plot
the rewards (coherent or model, KL part, total), the KL, the sample accuracy and careful share where a
verifier exists (with the greedy eval accuracy when logged), and the response length and EOS rate.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SrppoError
from .metrics import read_metrics

RL_PANELS = [
    ("reward", ["reward/coherent", "reward/model", "reward/kl", "reward/total"]),
    ("KL(pi || ref), nats per response", ["kl"]),
    ("accuracy", ["sample/accuracy", "sample/careful_rate", "eval/eval_id/accuracy", "eval/eval_ood/accuracy"]),
    ("response", ["response_length", "eos_rate"]),
]
LM_PANELS = [("loss", ["loss", "eval_loss"]), ("lr", ["lr"])]


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
    path = out / f"{stage}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_report(output_dir: str | os.PathLike) -> list[Path]:
    """Write one PNG per stage found in output_dir/metrics.jsonl; returns their paths."""
    metrics = Path(output_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise SrppoError(f"{metrics} does not exist; give the output_dir of a run (srppo-fast report RUN_DIR).")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SrppoError("srppo-fast report needs matplotlib: pip install 'srppo-fast[report]'.") from None
    rows = read_metrics(metrics)
    out = Path(output_dir) / "report"
    out.mkdir(exist_ok=True)
    written = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        stage_rows = [r for r in rows if r["stage"] == stage and "step" in r]
        rl = any("reward/total" in r for r in stage_rows)
        path = _figure(stage, stage_rows, RL_PANELS if rl else LM_PANELS, out)
        if path is not None:
            written.append(path)
    return written
