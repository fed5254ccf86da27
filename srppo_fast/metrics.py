"""Run metrics: one JSON object per line in output_dir/metrics.jsonl, and the progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm.auto import tqdm


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsLog:
    """Appends whole lines (each write is one line, flushed), so a crash never leaves half a record."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()

    def log(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        record.setdefault("time", round(time.time() - self.t0, 3))
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, unit="step")
