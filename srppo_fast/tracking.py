"""Experiment trackers beside metrics.jsonl: TensorBoard and Weights & Biases (logging.backends).

metrics.jsonl (and samples.jsonl) stay the ground truth; a tracker gets the same records with the same metric names,
one TensorBoard run / W&B run per stage (each stage has its own step axis). Only rank 0 logs.

A resumed stage (killed after its checkpoint at step N) must neither duplicate nor lose a point:
- TensorBoard: the stage's writer opens with purge_step = N + 1, so every reader drops what the killed run wrote
  after the checkpoint, and the resumed run writes it again. Writers are flushed at each checkpoint, so steps <= N
  are on disk.
- W&B: a run cannot be rewound from the client (offline runs cannot even be resumed: each session is a new
  offline-run directory of the same id). So on resume the tracker reads what the stage's W&B run already holds
  (the offline transaction logs, or the server's step online): the steps up to the checkpoint it lacks (written
  after the last flush of a killed run) are sent again from metrics.jsonl / samples.jsonl, and the resumed run's
  steps that the killed run already sent are not sent twice (resume is exact: they are the same numbers; timings
  aside).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import secrets
import struct
from pathlib import Path

from .errors import SrppoError
from .io import atomic_write_text

log = logging.getLogger("srppo_fast")

NOT_SCALARS = ("stage", "step", "time")
SAMPLE_COLUMNS = ["step", "pick", "reward", "correct", "prompt", "response", "log_ratio_sum", "log_ratio_max",
                  "log_ratio_max_token", "log_ratio_max_pos", "kl", "length", "ended"]


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record, as the trackers get them (stage, step and wall time are axes)."""
    out = {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif value in ("nan", "inf", "-inf"):  # metrics.jsonl spells non-finite numbers as strings
            out[key] = float(value)
    return out


def _by_step(records: list[dict]) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for r in records:
        if isinstance(r.get("step"), int):
            rows.setdefault(r["step"], {}).update(scalars(r))
    return rows


def _cell(value, width: int = 300) -> str:
    text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    text = text if len(text) <= width else text[:width] + " ..."
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def eval_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """An eval stage's rows (a model, a split, its metrics) as columns and cells."""
    columns = list(dict.fromkeys(k for r in rows for k in r if k not in ("stage", "time")))
    return columns, [[r.get(c) for c in columns] for r in rows]


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Tracker:
    """One backend. `start(stage, after_step, rows, samples)`: the stage begins (after_step None) or resumes after
    its checkpoint at after_step; `rows`/`samples` are what metrics.jsonl / samples.jsonl keep of it."""

    name = "tracker"

    def start(self, stage: str, after_step: int | None, rows: list[dict], samples: list[dict]) -> None: ...
    def log(self, record: dict) -> None: ...
    def samples(self, stage: str, step: int, rows: list[dict]) -> None: ...
    def flush(self) -> None: ...
    def end(self, stage: str) -> None: ...
    def close(self, failed: bool = False) -> None: ...


# ---------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardTracker(Tracker):
    """OUTPUT_DIR/tensorboard/<stage>: scalars, the samples tables and the eval table as text, the resolved config."""

    name = "tensorboard"

    def __init__(self, root: Path, config_yaml: str):
        from torch.utils.tensorboard import SummaryWriter

        self._writer_cls = SummaryWriter
        self.root, self.config_yaml = root, config_yaml
        self.writers: dict = {}
        self.tables: dict[str, list[dict]] = {}

    def _logdir(self, stage: str) -> Path:
        return self.root / re.sub(r"[^\w.-]", "_", stage)  # a stage name is never a path

    def _writer(self, stage: str, first_step: int = 0):
        if stage not in self.writers:
            # purge_step: readers drop this stage's events at steps >= first_step from earlier sessions (a killed
            # run's steps after its checkpoint); a fresh stage purges everything an earlier attempt wrote
            w = self._writer_cls(log_dir=str(self._logdir(stage)), purge_step=first_step, flush_secs=10)
            w.add_text("config", "\n".join("    " + line for line in self.config_yaml.splitlines()), first_step)
            self.writers[stage] = w
        return self.writers[stage]

    def start(self, stage, after_step, rows, samples):
        self._close(stage)
        self.tables.pop(stage, None)
        had_events = any(self._logdir(stage).glob("events.out.tfevents.*"))
        w = self._writer(stage, 0 if after_step is None else after_step + 1)
        if after_step is not None and not had_events:  # tensorboard added on resume: the steps before, from jsonl
            for record in rows:
                self.log(record)
            for step in sorted({s["step"] for s in samples}):
                self.samples(stage, step, [s for s in samples if s["step"] == step])
            w.flush()

    def log(self, record):
        stage, step = record.get("stage"), record.get("step")
        if not isinstance(step, int):  # an eval row: one table per stage, written when it ends
            self.tables.setdefault(stage, []).append(record)
            return
        w = self._writer(stage, step)
        for key, value in scalars(record).items():
            w.add_scalar(key, value, step)

    def samples(self, stage, step, rows):
        table = markdown_table(SAMPLE_COLUMNS, [[r.get(c) for c in SAMPLE_COLUMNS] for r in rows])
        self._writer(stage, step).add_text("samples", table, step)

    def flush(self):
        for w in self.writers.values():
            w.flush()

    def end(self, stage):
        rows = self.tables.pop(stage, None)
        if rows:
            self._writer(stage).add_text("eval", markdown_table(*eval_table(rows)), 0)
        self._close(stage)

    def _close(self, stage):
        w = self.writers.pop(stage, None)
        if w is not None:
            w.close()

    def close(self, failed=False):
        for stage in list(self.tables):
            self.end(stage)
        for stage in list(self.writers):
            self._close(stage)


# ---------------------------------------------------------------------------------------------
# Weights & Biases


def _wandb_records(path: str):
    """The records of an offline W&B transaction log (run-<id>.wandb): a 7-byte header, then LevelDB-log framing
    (32 KiB blocks of chunks: crc32c u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last), each record a
    wandb_internal_pb2.Record. A tail cut short (a killed writer) ends the iteration."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b":W&B":
        raise SrppoError(f"{path} is not a W&B transaction log (no ':W&B' header).")
    block, pos, parts = 32768, 7, []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's trailer
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding
            pos += room
            continue
        if pos + 7 + length > len(data):
            return
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = [chunk] if kind in (1, 2) else parts + [chunk]
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_offline_segments(wandb_dir: str | Path, run_id: str) -> list[list[dict]]:
    """Every offline session of one W&B run id (OUTPUT_DIR/wandb/offline-run-*-<id>*/run-<id>.wandb), oldest first:
    each a list of history rows ({"_step": n, key: value, ...}; a table is its {"_type": "table-file", ...})."""
    segments = []
    for path in glob.glob(os.path.join(str(wandb_dir), f"offline-run-*-{run_id}*", f"run-{run_id}.wandb")):
        start, rows = 0, []
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                start = record.run.start_time.ToNanoseconds()
            elif kind == "history":
                row: dict = {}
                for item in record.history.item:
                    *parents, key = [item.key] if item.key else list(item.nested_key)
                    place = row
                    for parent in parents:  # a table's fields arrive one by one: {"samples": {"path": ...}}
                        place = place.setdefault(parent, {})
                    place[key] = json.loads(item.value_json)
                rows.append(row)
        segments.append((start, path, rows))
    return [rows for _, _, rows in sorted(segments)]


class WandbTracker(Tracker):
    """One W&B run per stage (group: the run), with the resolved config; offline by default (OUTPUT_DIR/wandb/)."""

    name = "wandb"

    def __init__(self, out: Path, cfg, config: dict):
        import wandb

        self.wandb, self.out, self.cfg, self.config = wandb, out, cfg, config
        self.group = cfg.group or Path(out).resolve().name
        self.ids_path = out / "wandb" / "srppo-fast-runs.json"
        self.run = self.stage = None
        self.first_new = 0  # steps below this are in the W&B run already
        self.pending_step, self.pending = None, {}
        self.tables: list[dict] = []

    def _ids(self) -> dict:
        try:
            return json.loads(self.ids_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _held_steps(self, run_id: str) -> int:
        """The last step the stage's W&B run holds (-1: none)."""
        if self.cfg.mode == "offline":
            steps = [row["_step"] for rows in wandb_offline_segments(self.out / "wandb", run_id) for row in rows
                     if isinstance(row.get("_step"), int)]
            return max(steps, default=-1)
        return int(getattr(self.run, "starting_step", 0) or 0) - 1 if self.run.resumed else -1

    def start(self, stage, after_step, rows, samples):
        self._finish()
        ids = self._ids()
        if after_step is None or stage not in ids:  # a fresh stage is a new W&B run: the old one is history
            ids[stage] = f"{re.sub(r'[^A-Za-z0-9_-]', '-', self.group)[:40]}-{stage}-{secrets.token_hex(4)}"
            self.ids_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.ids_path, json.dumps(ids, indent=1))
        run_id = ids[stage]
        settings = self.wandb.Settings(x_transaction_log_flush_interval=1.0, console="off", x_disable_stats=True,
                                       silent=True)
        try:
            self.run = self.wandb.init(
                mode=self.cfg.mode, project=self.cfg.project, entity=self.cfg.entity, dir=str(self.out), id=run_id,
                group=self.group, name=stage, job_type=stage,
                tags=list(self.cfg.tags) or None, config={**self.config, "stage": stage}, reinit="finish_previous",
                resume="allow" if self.cfg.mode == "online" else None, settings=settings)
        except Exception as e:  # noqa: BLE001 - wandb raises many kinds (no login, no network, ...)
            raise SrppoError(f"W&B could not start the run of stage '{stage}' ({type(e).__name__}: {e}); run "
                             "`wandb login` for logging.wandb.mode=online, or set logging.wandb.mode=offline.") from e
        self.stage, self.tables = stage, []
        held = self._held_steps(run_id) if after_step is not None else -1
        self.first_new = held + 1
        if after_step is not None and held < after_step:  # what a killed run had not flushed, from the ground truth
            lost = {step: row for step, row in _by_step(rows).items() if held < step <= after_step}
            table_rows: dict[int, list[dict]] = {}
            for s in samples:
                if held < s["step"] <= after_step:
                    table_rows.setdefault(s["step"], []).append(s)
            for step in sorted(set(lost) | set(table_rows)):
                self._add(step, lost.get(step, {}))
                if step in table_rows:
                    self._add(step, {"samples": self._table(table_rows[step])})
            self._send()
            log.info("wandb: stage %s resumed in run %s; steps %d-%d re-sent from metrics.jsonl", stage, run_id,
                     held + 1, after_step)
        self.first_new = max(self.first_new, (after_step or -1) + 1)

    def _table(self, rows: list[dict]):
        return self.wandb.Table(columns=SAMPLE_COLUMNS, data=[[r.get(c) for c in SAMPLE_COLUMNS] for r in rows])

    def _add(self, step: int, values: dict) -> None:
        if self.pending_step is not None and step != self.pending_step:
            self._send()
        self.pending_step = step
        self.pending.update(values)

    def _send(self) -> None:
        if self.pending_step is not None and self.pending:
            self.run.log(self.pending, step=self.pending_step, commit=True)
        self.pending_step, self.pending = None, {}

    def _ensure(self, stage: str) -> bool:
        if self.stage != stage:
            self.start(stage, None, [], [])
        return self.run is not None

    def log(self, record):
        stage, step = record.get("stage"), record.get("step")
        if not self._ensure(stage):
            return
        if not isinstance(step, int):
            self.tables.append(record)
            return
        if step >= self.first_new:
            self._add(step, scalars(record))

    def samples(self, stage, step, rows):
        if self._ensure(stage) and step >= self.first_new:
            self._add(step, {"samples": self._table(rows)})

    def flush(self):
        if self.run is not None:
            self._send()

    def end(self, stage):
        if self.stage == stage:
            self._finish()

    def _finish(self, failed: bool = False) -> None:
        if self.run is None:
            return
        self._send()
        if self.tables:
            columns, data = eval_table(self.tables)
            self.run.log({"eval": self.wandb.Table(columns=columns, data=data)})
            for r in self.tables:
                for key, value in scalars(r).items():
                    self.run.summary[f"{r.get('model')}/{r.get('split')}/{key}"] = value
        self.run.finish(exit_code=1 if failed else 0)
        self.run = self.stage = None
        self.tables = []

    def close(self, failed=False):
        self._finish(failed)


def make_trackers(cfg, out: Path) -> list[Tracker]:
    """The trackers of cfg.logging.backends, each given the resolved config."""
    from .checks import resolved_config_text
    from .config import to_dict

    trackers: list[Tracker] = []
    if "tensorboard" in cfg.logging.backends:
        trackers.append(TensorBoardTracker(out / "tensorboard", resolved_config_text(cfg)))
    if "wandb" in cfg.logging.backends:
        trackers.append(WandbTracker(out, cfg.logging.wandb, to_dict(cfg)))
    return trackers
