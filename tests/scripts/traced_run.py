"""`srppo-fast train` with the linear-layer dtype trace on (helpers.linear_dtype_trace), for test_precision.py.

    python tests/scripts/traced_run.py RESULT.json CONFIG [KEY=VALUE ...]      (or under torchrun)

Writes RESULT.rank<R>.json: the trace per phase; every model the stages placed (stage, role, parameter bytes
measured on this rank) and whether it is still alive after the run; any model of an earlier stage found alive
when a later stage placed one; and the --dry-run memory plan's parameter bytes for the same world; the error a
stage ended with, if one did (the run's models must be released all the same).
"""

from __future__ import annotations

import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from srppo_fast import dist, runner  # noqa: E402
from srppo_fast.config_load import load_config  # noqa: E402
from srppo_fast.engine.memory import plan_memory  # noqa: E402
from srppo_fast.errors import SrppoError  # noqa: E402
from tests.helpers import linear_dtype_trace  # noqa: E402


def main(result: str, config: str, *overrides: str) -> None:
    cfg = load_config(config, list(overrides))
    early_alive: list[str] = []
    track = runner.RunContext.track

    def checked_track(self, stage, role, model):
        gc.collect()
        early_alive.extend(f"{m.stage} {m.role} (alive when {stage} placed {role})" for m in self.loaded
                           if m.stage != stage and m.model() is not None)
        return track(self, stage, role, model)

    runner.RunContext.track = checked_track
    contexts, error = [], None
    prepare = runner.prepare

    def keep(*args):
        contexts.append(prepare(*args))
        return contexts[-1]

    runner.prepare = keep
    with linear_dtype_trace() as trace:
        try:
            runner.run(cfg)
        except SrppoError as e:  # a stage that failed: what it placed must be released all the same
            error = str(e)
    ctx = contexts[0]
    gc.collect()
    plans = plan_memory(cfg, dist.world_size(), 1, 80.0)
    out = {"trace": {phase: [[i, w, n] for (i, w), n in calls.items()] for phase, calls in trace.items()},
           "loaded": [[m.stage, m.role, m.param_bytes, m.model() is not None] for m in ctx.loaded],
           "early_alive": early_alive,
           "plan": [[p.name, m.role, m.param_bytes] for p in plans for m in p.models if not m.sampler],
           "world_size": dist.world_size(), "error": error}
    with open(result.replace(".json", f".rank{dist.rank()}.json"), "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
