"""logging.backends: TensorBoard events and W&B offline runs read back hold what metrics.jsonl holds, each point
once, also across a run killed with SIGKILL and resumed; samples tables (samples.jsonl and the trackers); the
config errors of the logging section."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srppo_fast.cli import main
from srppo_fast.config_load import load_config
from srppo_fast.errors import ConfigError
from srppo_fast.metrics import read_metrics
from srppo_fast.tracking import wandb_offline_segments

from .helpers import QUICKSTART, expected, same, tb_read, tiny_run_overrides, wandb_points, wandb_rows

TINY_RL = ["srppo.prompts_per_step=4", "srppo.rollout.n_samples=2", "srppo.ppo.train_batch_size=4",
           "srppo.rollout.max_new_tokens=12", "srppo.max_prompt_len=32", "srppo.ppo.micro_batch_tokens=256",
           "srppo.critic.warmup_buffers=0", "srppo.eval_every=0", "srppo.optim.lr=1e-3", "srppo.critic.optim.lr=1e-3",
           "eval.max_new_tokens=12", "srppo.reward.no_eos=keep", "logging.samples_every=1", "logging.num_samples=5"]
needs_tb = pytest.mark.requires("tensorboard")
needs_wandb = pytest.mark.requires("wandb")


@pytest.fixture(autouse=True)
def _wandb_home(tmp_path, monkeypatch):
    """W&B's own cache, data and settings directories inside the test's: nothing lands in the user's home. W&B
    in this process exports WANDB_SERVICE (its service's socket): a run launched later would join that service,
    where a killed run's stream still holds its id, so it is not passed on."""
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    yield
    os.environ.pop("WANDB_SERVICE", None)


# ---------------------------------------------------------------------------------------------
# config


def test_unknown_backend_is_one_error_with_the_known_ones():
    with pytest.raises(ConfigError,
                       match=r"logging.backends: unknown backend 'tensorbord'; did you mean 'tensorboard'"):
        load_config(QUICKSTART, ["logging.backends=[jsonl,tensorbord]"], check_files=False)
    with pytest.raises(ConfigError, match="lists a backend twice"):
        load_config(QUICKSTART, ["logging.backends=[wandb,wandb]"], check_files=False)


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_backend_that_is_not_installed_names_the_extra(monkeypatch, tmp_path, backend, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == backend else real(name, *a))
    out = tmp_path / "run"
    assert main(["train", "--config", QUICKSTART, f"output_dir={out}", f"logging.backends=[{backend}]"]) == 2
    err = capsys.readouterr().err
    assert f"pip install 'srppo-fast[{backend}]'" in err and "logging.backends" in err
    assert not out.exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# a whole run, every backend


@needs_tb
@needs_wandb
def test_trackers_hold_what_metrics_jsonl_holds(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", QUICKSTART, *tiny_run_overrides(out), *TINY_RL, "srppo.max_steps=3",
            "stages=[pretrain,sft,srppo,eval]", "logging.backends=[jsonl,tensorboard,wandb]"]
    assert main(args) == 0
    for stage in ("pretrain", "sft", "srppo"):
        want = expected(out, stage)
        assert want, stage
        tb, texts = tb_read(out / "tensorboard" / stage)
        same(tb, want)
        same(wandb_points(wandb_rows(out, stage)), want)
        assert "output_dir:" in texts["config/text_summary"][0]  # the resolved config, at the stage's first step
    # samples: every buffer (samples_every=1), 5 rows, the extremes of the reward first
    samples = read_metrics(out / "samples.jsonl")
    assert sorted({r["step"] for r in samples}) == [1, 2, 3]
    for step in (1, 2, 3):
        rows = [r for r in samples if r["step"] == step]
        assert [r["pick"] for r in rows] == ["highest", "lowest", "random", "random", "random"]
        assert rows[0]["reward"] >= max(r["reward"] for r in rows)
        assert rows[1]["reward"] <= min(r["reward"] for r in rows)
        for r in rows:
            assert r["stage"] == "srppo" and r["prompt"] and isinstance(r["correct"], bool)
            assert r["log_ratio_max"] <= r["log_ratio_sum"] + 1e-6 or r["length"] > 1
            assert 0 <= r["log_ratio_max_pos"] < r["length"] and isinstance(r["log_ratio_max_token"], str)
    _, texts = tb_read(out / "tensorboard" / "srppo")
    assert sorted(texts["samples/text_summary"]) == [1, 2, 3]
    assert all(rows["pick"] in texts["samples/text_summary"][rows["step"]] for rows in samples)
    tables = [row for row in wandb_rows(out, "srppo") if "samples" in row]
    assert [row["_step"] for row in tables] == [1, 2, 3]
    ids = json.loads((out / "wandb" / "srppo-fast-runs.json").read_text())
    table = next((out / "wandb").glob(f"offline-run-*-{ids['srppo']}/files/{tables[-1]['samples']['path']}"))
    data = json.loads(table.read_text())
    assert [row[1] for row in data["data"]] == ["highest", "lowest", "random", "random", "random"]
    # the eval table
    _, texts = tb_read(out / "tensorboard" / "eval")
    assert "eval_ood" in texts["eval/text_summary"][0]
    # the HTML report reads this run's samples.jsonl
    import html

    from srppo_fast.report import make_report

    page = next(p for p in make_report(out, warn=pytest.fail) if p.name == "index.html").read_text()
    readable = [r["response"] for r in samples if r["response"].replace("\n", "").isprintable()]
    assert readable and all(html.escape(text) in page for text in readable)


# ---------------------------------------------------------------------------------------------
# SIGKILL and resume


def _kill_at(proc: subprocess.Popen, metrics: Path, stage: str, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(r.get("stage") == stage and r.get("step", 0) >= step
                                     for r in read_metrics(metrics, on_truncated_tail=lambda _: None)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.05)
    raise AssertionError(f"{stage} never reached step {step} (exit code {proc.poll()})")


@needs_tb
@needs_wandb
def test_a_run_killed_and_resumed_has_each_point_once_everywhere(tmp_path):
    """SIGKILL in the middle of SRPPO (after its checkpoint at step 2): the resumed run's trackers end with steps
    1-6 once each, values equal to metrics.jsonl (resume is exact), the samples tables once each."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "srppo_fast", "train", "--config", QUICKSTART, *tiny_run_overrides(out), *TINY_RL,
            "srppo.max_steps=6", "srppo.save_every=2", "stages=[pretrain,sft,srppo]",
            "logging.backends=[jsonl,tensorboard,wandb]"]
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_at(proc, out / "metrics.jsonl", "srppo", 4)
    killed = {r["step"] for r in read_metrics(out / "metrics.jsonl", on_truncated_tail=lambda _: None)
              if r["stage"] == "srppo"}
    assert max(killed) >= 4
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "%|" not in line)[-3000:]
    assert "resuming srppo from step" in done.stderr
    want = expected(out, "srppo")
    assert sorted(want["reward/total"]) == [1, 2, 3, 4, 5, 6]
    tb, texts = tb_read(out / "tensorboard" / "srppo")
    same(tb, want)
    assert sorted(texts["samples/text_summary"]) == [1, 2, 3, 4, 5, 6]
    rows = wandb_rows(out, "srppo")
    # timings are the only numbers a resumed step does not repeat; W&B keeps what it already had of them
    same(wandb_points(rows), want, timings=False)
    assert sorted(row["_step"] for row in rows if "samples" in row) == [1, 2, 3, 4, 5, 6]
    samples = [r for r in read_metrics(out / "samples.jsonl") if r["stage"] == "srppo"]
    assert sorted({r["step"] for r in samples}) == [1, 2, 3, 4, 5, 6] and len(samples) == 6 * 5
    # the stages before were not touched by the resume: still once each
    for stage in ("pretrain", "sft"):
        same(tb_read(out / "tensorboard" / stage)[0], expected(out, stage))
        same(wandb_points(wandb_rows(out, stage)), expected(out, stage))


def _wait_for_steps(out, stage: str, steps: list[int], timeout: float = 60.0) -> list[dict]:
    """The stage's W&B rows once they hold `steps` (W&B's service flushes its offline log every second, after
    close() returns), or what they hold after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    rows = wandb_rows(out, stage)
    while [r["_step"] for r in rows] != steps and time.monotonic() < deadline:
        time.sleep(0.25)
        rows = wandb_rows(out, stage)
    return rows


def _rows(stage: str, steps) -> list[dict]:
    return [{"stage": stage, "step": s, "loss": 1.0 / s, "time/step": 0.5} for s in steps]


@needs_wandb
@pytest.mark.parametrize("held,after", [(1, 3), (4, 2), (2, 2)], ids=["lost-before-checkpoint", "ahead-of-checkpoint",
                                                                        "at-checkpoint"])
def test_wandb_resume_resends_what_it_lacks_and_skips_what_it_has(tmp_path, held, after):
    """The killed session's W&B run holds steps 1..held; the checkpoint is at `after`; the resumed session logs
    after+1..6. Whatever `held` is, the run's sessions together hold 1..6 once each, the samples tables too."""
    from srppo_fast.config import WandbConfig
    from srppo_fast.tracking import WandbTracker

    config = {"output_dir": str(tmp_path)}
    killed = WandbTracker(tmp_path, WandbConfig(), config)
    killed.start("srppo", None, [], [])
    for row in _rows("srppo", range(1, held + 1)):
        killed.log(row)
        killed.samples("srppo", row["step"], [{"pick": "highest", "reward": 1.0, "prompt": "p", "response": "r"}])
    killed.close()
    # W&B's service writes the offline log on its own schedule (it flushes every second): a resumed run starts in a
    # new process, long after; here, in the same process, wait until what the killed session logged is on disk
    _wait_for_steps(tmp_path, "srppo", list(range(1, held + 1)))
    kept = _rows("srppo", range(1, after + 1))  # what metrics.jsonl keeps: up to the checkpoint
    tables = [{"stage": "srppo", "step": s, "pick": "highest", "reward": 1.0, "prompt": "p", "response": "r"}
              for s in range(1, after + 1)]
    resumed = WandbTracker(tmp_path, WandbConfig(), config)
    resumed.start("srppo", after, kept, tables)
    for row in _rows("srppo", range(after + 1, 7)):
        resumed.log(row)
        resumed.samples("srppo", row["step"], [{"pick": "lowest", "reward": 0.0, "prompt": "p", "response": "r"}])
    resumed.close()
    rows = _wait_for_steps(tmp_path, "srppo", [1, 2, 3, 4, 5, 6])
    assert [r["_step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] == 1.0 / r["_step"] and "samples" in r for r in rows)
    ids = json.loads((tmp_path / "wandb" / "srppo-fast-runs.json").read_text())
    assert len(wandb_offline_segments(tmp_path / "wandb", ids["srppo"])) == 2  # one W&B run id, two sessions


@needs_wandb
def test_wandb_a_stage_started_afresh_is_a_new_run(tmp_path):
    from srppo_fast.config import WandbConfig
    from srppo_fast.tracking import WandbTracker

    ids = []
    for _ in range(2):
        tracker = WandbTracker(tmp_path, WandbConfig(), {})
        tracker.start("sft", None, [], [])
        for row in _rows("sft", range(1, 4)):
            tracker.log(row)
        tracker.close()
        ids.append(json.loads((tmp_path / "wandb" / "srppo-fast-runs.json").read_text())["sft"])
    assert ids[0] != ids[1]
    assert [r["_step"] for r in wandb_rows(tmp_path, "sft")] == [1, 2, 3]


def test_a_failing_tracker_is_switched_off_with_one_warning(tmp_path):
    import logging

    from srppo_fast.metrics import MetricsLog
    from srppo_fast.tracking import Tracker

    class Broken(Tracker):
        name = "broken"

        def log(self, record):
            raise OSError(28, "No space left on device")

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("srppo_fast").addHandler(handler)
    metrics = MetricsLog(tmp_path / "metrics.jsonl", [Broken()])
    metrics.drop("sft")
    for row in _rows("sft", range(1, 4)):
        metrics.log(row)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]  # the record goes on
    logging.getLogger("srppo_fast").removeHandler(handler)
    warnings = [m for m in seen if "logging backend broken failed" in m]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and metrics.trackers == []


@needs_tb
def test_tensorboard_added_on_resume_gets_the_steps_before_from_jsonl(tmp_path):
    """A run resumed with tensorboard newly in logging.backends: the stage's steps up to the checkpoint come
    from metrics.jsonl / samples.jsonl, the rest from the resumed run; each once."""
    from srppo_fast.tracking import TensorBoardTracker

    tb = TensorBoardTracker(tmp_path / "tensorboard", "seed: 0\n")
    tb.start("srppo", 2, _rows("srppo", [1, 2]), [{"stage": "srppo", "step": 2, "pick": "highest", "reward": 1.0}])
    for row in _rows("srppo", [3, 4]):
        tb.log(row)
    tb.close()
    scalars_, texts = tb_read(tmp_path / "tensorboard" / "srppo")
    assert scalars_["loss"] == {s: pytest.approx(1.0 / s) for s in (1, 2, 3, 4)}
    assert sorted(texts["samples/text_summary"]) == [2]
