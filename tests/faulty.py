"""`python -m tests.faulty <srppo-fast arguments>` (or torchrun's `-m tests.faulty`): srppo-fast with the faults
the tests ask for installed as hooks (srppo_fast/faults.py) before the run. srppo-fast itself reads none of these
variables:

    SRPPO_FAST_TEST_FS_TRACE=FILE          append "N label" for each filesystem step of the process's saves
    SRPPO_FAST_TEST_KILL_AT=N              SIGKILL the process just before its N-th filesystem step
    SRPPO_FAST_TEST_SAMPLER_HANG=N         the vLLM sampler's N-th generate never returns
    SRPPO_FAST_TEST_SAMPLER_FAIL_SYNC=R    rank R's sampler fails loading the second bucket of each weight sync
    SRPPO_FAST_TEST_SKIP_SYNC_BUCKET=B     bucket B of every weight sync after the first is not sent
    SRPPO_FAST_TEST_DROP_SYNCS=1           no bucket of any weight sync after the first is sent (the sampler keeps
                                           its first weights, as verl's #7495 did)
    SRPPO_FAST_TEST_SIGTERM_AT=STAGE:N     SIGTERM the process once STAGE's step N is logged (a kill at an exact
                                           step, whatever the machine's speed)
"""

from __future__ import annotations

import os
import signal
import sys
import time

from srppo_fast import faults


def install_from_environment(env=os.environ) -> None:
    trace, kill_at = env.get("SRPPO_FAST_TEST_FS_TRACE"), env.get("SRPPO_FAST_TEST_KILL_AT")
    if trace or kill_at:
        def fs_step(n: int, label: str) -> None:
            if trace:
                with open(trace, "a", encoding="utf-8") as fh:
                    fh.write(f"{n} {label}\n")
            if kill_at == str(n):
                os.kill(os.getpid(), signal.SIGKILL)

        faults.install("fs_step", fs_step)
    hang = env.get("SRPPO_FAST_TEST_SAMPLER_HANG")
    if hang:
        faults.install("sampler_generate", lambda call, run: (lambda: time.sleep(10**6)) if str(call) == hang else None)
    fail_rank, skip = env.get("SRPPO_FAST_TEST_SAMPLER_FAIL_SYNC"), env.get("SRPPO_FAST_TEST_SKIP_SYNC_BUCKET")
    drop = env.get("SRPPO_FAST_TEST_DROP_SYNCS")
    if fail_rank or skip or drop:
        def sync_bucket(rank: int, bucket: int, syncs: int, load):
            if syncs and (drop or (skip and bucket == int(skip))):
                return "skip"
            if fail_rank == str(rank) and bucket == 1:
                return _injected_failure
            return None

        faults.install("sync_bucket", sync_bucket)
    sigterm_at = env.get("SRPPO_FAST_TEST_SIGTERM_AT")
    if sigterm_at:
        stage_at, step_at = sigterm_at.rsplit(":", 1)

        def step_logged(stage: str, step: int) -> None:
            if stage == stage_at and step == int(step_at):
                os.kill(os.getpid(), signal.SIGTERM)

        faults.install("step_logged", step_logged)


def _injected_failure():
    raise RuntimeError("injected sampler failure during the weight sync (SRPPO_FAST_TEST_SAMPLER_FAIL_SYNC)")


if __name__ == "__main__":
    install_from_environment()
    from srppo_fast.cli import main

    sys.exit(main(sys.argv[1:]))
