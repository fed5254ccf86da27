"""Run metrics: one JSON object per line in output_dir/metrics.jsonl, and the progress bar."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .errors import DataError
from .io import atomic_file


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class NullMetricsLog:
    """What ranks other than 0 log to: nothing (rank 0 logs every record once)."""

    def log(self, record: dict) -> None:
        pass

    def drop(self, stage: str, after_step: int | None = None) -> None:
        pass


class MetricsLog:
    """Appends whole lines (each write is one line, flushed). A process killed in the middle of a write can
    still leave the last line cut short: opening the log again (a resumed run) cuts that partial line off,
    so the next record does not join it into one corrupt line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self._drop_partial_tail()

    def _drop_partial_tail(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if not data or data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            fh.truncate(keep)
        logging.getLogger("srppo_fast").warning("%s: dropped a partial last line (%d bytes; the run that wrote it "
                                                "was killed mid-write)", self.path, len(data) - keep)

    def log(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        record.setdefault("time", round(time.time() - self.t0, 3))
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def drop(self, stage: str, after_step: int | None = None) -> None:
        """Drop the stage's rows past `after_step` (logged after the last save of a killed run), or all of them
        when `after_step` is None (the stage starts afresh), so no (stage, step) is ever logged twice."""
        if not self.path.is_file():
            return
        rows = read_metrics(self.path)
        keep = [r for r in rows
                if not (r.get("stage") == stage and (after_step is None or r.get("step", 0) > after_step))]
        if len(keep) != len(rows):
            with atomic_file(self.path) as fh:
                fh.writelines(json.dumps(r) + "\n" for r in keep)


def _missing(row: dict, require: dict[str, type]) -> str | None:
    for key, tp in require.items():
        if key not in row:
            return f"a row without '{key}' (every row srppo-fast logs has one)"
        if not isinstance(row[key], tp):
            return f"'{key}' is {type(row[key]).__name__}, not {tp.__name__}"
    return None


def read_metrics(path: str | Path, *, require: dict[str, type] | None = None,
                 on_truncated_tail: Callable[[str], None] | None = None) -> list[dict]:
    """The rows of a metrics.jsonl, in order (blank lines skipped).

    Strict by default: a line that is not a JSON object (or lacks a key of `require`, or has it with another
    type) raises DataError naming file:line, as does a file that cannot be read. Tolerant of a killed
    writer with `on_truncated_tail`: a last line that does not parse (cut short mid-write) is skipped and
    the callback gets a one-line warning naming file:line; a bad line anywhere else still raises, and so
    does a last line that parses but lacks a required key."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            lines = fh.read().split(b"\n")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; check that this user may read it.") from None
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    rows = []
    for n, (lineno, raw) in enumerate(numbered, 1):
        cut_short = True  # what a write cut short can look like; a whole row lacking a key cannot
        try:
            row = json.loads(raw.decode("utf-8"))
            problem = None if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
            if problem is None:
                problem, cut_short = _missing(row, require or {}), False
        except UnicodeDecodeError as e:
            problem = f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        except json.JSONDecodeError as e:
            problem = f"not valid JSON at column {e.colno} ({e.msg})"
        if problem is None:
            rows.append(row)
        elif cut_short and on_truncated_tail is not None and n == len(numbered):
            on_truncated_tail(f"{path}:{lineno}: skipped the last line, {problem}: cut short when the run was "
                              "killed?")
        else:
            raise DataError(f"{path}:{lineno}: {problem}; every line of a metrics log is one JSON object written by "
                            "srppo-fast: repair or delete that line.")
    return rows


def progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, unit="step")
