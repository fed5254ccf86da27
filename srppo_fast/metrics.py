"""Run metrics: one JSON object per line in output_dir/metrics.jsonl (samples tables in samples.jsonl), fanned out
to the trackers of logging.backends (tracking.py), and the progress bar."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from .errors import DataError, SrppoError, StorageError
from .io import atomic_file


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class NullMetricsLog:
    """What ranks other than 0 log to: nothing (rank 0 logs every record once)."""

    def log(self, record: dict) -> None:
        pass

    def log_samples(self, stage: str, step: int, rows: list[dict]) -> None:
        pass

    def drop(self, stage: str, after_step: int | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def end_stage(self, stage: str) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class MetricsLog:
    """Appends whole lines (each write is one line, flushed). A process killed in the middle of a write can
    still leave the last line cut short: opening the log again (a resumed run) cuts that partial line off,
    so the next record does not join it into one corrupt line."""

    def __init__(self, path: str | Path, trackers: list | None = None):
        self.path = Path(path)
        self.samples_path = self.path.parent / "samples.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.trackers = list(trackers or [])  # tracking.Tracker: TensorBoard, W&B
        for path in (self.path, self.samples_path):
            _drop_partial_tail(path)

    def _append(self, path: Path, records: list[dict]) -> None:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in records))
                fh.flush()
        except OSError as e:  # a full disk: the OS names no path; this line does (a cut line is dropped on resume)
            raise StorageError(f"cannot append to {path}: {e.strerror or e}; free some space and run the same command: "
                               "it resumes from the last checkpoint, which is intact.") from None

    def _each_tracker(self, method: str, *args) -> None:
        """A tracker that fails is switched off with one warning; metrics.jsonl goes on (it is the record).
        A configuration problem it raises (SrppoError: e.g. W&B online without a login) stops the run."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except SrppoError:
                raise
            except Exception as e:  # noqa: BLE001 - a tracker's own failure must not end training
                self.trackers.remove(tracker)
                logging.getLogger("srppo_fast").warning(
                    "logging backend %s failed (%s: %s) and is off for the rest of this run; metrics.jsonl has "
                    "every record", tracker.name, type(e).__name__, e)

    def log(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        record.setdefault("time", round(time.time() - self.t0, 3))
        self._append(self.path, [record])
        self._each_tracker("log", record)

    def log_samples(self, stage: str, step: int, rows: list[dict]) -> None:
        """A samples table of one step: samples.jsonl (one row a line) and each tracker's table."""
        rows = [{"stage": stage, "step": step, **{k: _clean(v) for k, v in r.items()}} for r in rows]
        self._append(self.samples_path, rows)
        self._each_tracker("samples", stage, step, rows)

    def drop(self, stage: str, after_step: int | None = None) -> None:
        """Drop the stage's rows past `after_step` (logged after the last save of a killed run), or all of them
        when `after_step` is None (the stage starts afresh), so no (stage, step) is ever logged twice; samples.jsonl
        likewise. Then the trackers start the stage's run (or resume it after `after_step`)."""
        kept = {}
        for path in (self.path, self.samples_path):
            rows = read_metrics(path) if path.is_file() else []
            keep = [r for r in rows
                    if not (r.get("stage") == stage and (after_step is None or r.get("step", 0) > after_step))]
            if len(keep) != len(rows):
                with atomic_file(path) as fh:
                    fh.writelines(json.dumps(r) + "\n" for r in keep)
            kept[path] = [r for r in keep if r.get("stage") == stage]
        self._each_tracker("start", stage, after_step, kept[self.path], kept[self.samples_path])

    def flush(self) -> None:
        """Make the trackers' records durable (called before each checkpoint save)."""
        self._each_tracker("flush")

    def end_stage(self, stage: str) -> None:
        self._each_tracker("end", stage)

    def close(self, failed: bool = False) -> None:
        self._each_tracker("close", failed)


def _drop_partial_tail(path: Path) -> None:
    """A process killed in the middle of a write can leave the last line cut short: cut it off, so the next record
    does not join it into one corrupt line."""
    if not path.is_file():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        fh.truncate(keep)
    logging.getLogger("srppo_fast").warning("%s: dropped a partial last line (%d bytes; the run that wrote it "
                                            "was killed mid-write)", path, len(data) - keep)


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


def device_memory(device) -> dict[str, float]:
    """The CUDA device's peak allocated and reserved memory (GiB) since the last call (the step's, when called once
    per step), then the peaks are reset; {} elsewhere. What --dry-run's memory plan is checked against."""
    import torch

    if device.type != "cuda":
        return {}
    out = {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
           "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    torch.cuda.reset_peak_memory_stats(device)
    return out
