"""`srppo-fast profile`: N steps of a config's RL stage, and where their time went.

The stage runs as it would in training (same engines, sampler, overlap), from the checkpoints of the config's
output_dir, into OUTPUT_DIR/profile/ (the run's own checkpoints are untouched). Per step, from the metrics the
stage logs:

    generate  the time the trainer waited for the buffer (all of the sampling on-policy; with rollout.async
              only what was not hidden behind the previous update)
    sync      weight sync into the sampler (and its probe check)
    score     frozen forwards: old policy, pi_SFT, pi_PT, critic
    adv       rewards and advantages
    update    PPO epochs (actor and critic)
    hidden    the fraction of the sampler's own time that ran during the update (async only)

then tokens/s and samples/s, and on a GPU the update's model FLOPs utilisation (6 x parameters x trained tokens
over the update time and the device's bf16 dense peak). `--trace DIR` records a torch profiler trace of the
steps (chrome://tracing or Perfetto).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from pathlib import Path

from .config import Config
from .config_load import load_config
from .errors import ConfigError
from .stages import stage_of

log = logging.getLogger("srppo_fast")

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "B200": 2250.0}
PHASES = (("generate", "time/generate"), ("sync", "time/sync"), ("score", "time/score"),
          ("adv", "time/advantages"), ("update", "time/update"))


def profile_config(path: str, overrides: list[str], steps: int) -> tuple[Config, str]:
    """The config to profile with: the first RL stage of `path` alone, `steps` steps, reading the models of
    the run's complete stages by path, writing into OUTPUT_DIR/profile. The critic's warm-up is skipped (the
    actor trains from the first step) unless the overrides set it. It logs to metrics.jsonl only, unless the
    overrides set logging keys."""
    from .modeling import checkpoint_info
    cfg = load_config(path, overrides)
    rl_stages = [s for s in cfg.stages if stage_of(cfg, s).profiled]
    if not rl_stages:
        raise ConfigError(f"{path} lists no RL stage (stages: {', '.join(cfg.stages)}); profile measures an RL "
                          "stage: add srppo or ppo_rm to stages.")
    name = rl_stages[0]
    out = Path(cfg.output_dir)
    profile_dir = out / "profile"
    extra = [f"output_dir={profile_dir}", f"stages=[{name}]", f"{name}.max_steps={steps}", f"{name}.save_every=0",
             f"{name}.eval_every=0", f"{name}.log_every=1"]
    if not any(o.startswith("logging.") for o in overrides):  # a profile is not a run to track: jsonl only
        extra += ["logging.backends=[jsonl]", "logging.samples_every=0"]
    if not any(o.startswith(f"{name}.critic.warmup_buffers=") for o in overrides):
        extra.append(f"{name}.critic.warmup_buffers=0")  # the steady state: the actor trains from step 1
    for key, ref in stage_of(cfg, name).model_keys().items():
        if cfg.is_stage(ref):
            ckpt = out / "checkpoints" / ref
            info = checkpoint_info(ckpt)
            if info is None or not info.get("complete"):
                raise ConfigError(f"profile runs {name}, which reads {key}='{ref}' from {ckpt}, and that "
                                  f"stage is not complete there; train it first: srppo-fast train --config {path}"
                                  + (" " + " ".join(overrides) if overrides else ""))
            extra.append(f"{key}={ckpt.absolute()}")
    return load_config(path, [*overrides, *extra]), name


def _peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device:
            return tflops * 1e12
    return None


def run_profile(path: str, overrides: list[str], steps: int, trace: str | None) -> str:
    from . import dist
    from .config import resolved_engine
    from .engine import resolve_device
    from .metrics import read_metrics
    from .runner import run

    cfg, name = profile_config(path, overrides, steps)
    out = Path(cfg.output_dir)
    if resolved_engine(cfg) == "deepspeed" or dist.launched():
        dist.init(resolve_device(cfg.runtime.device))
    if dist.rank() == 0:
        from .lock import RunLockedError, lock_holder

        holder = lock_holder(out)
        if holder is not None:  # another profile is writing there: never sweep it away
            raise RunLockedError(f"{out} is in use by another run ({holder}); wait for it to finish.")
        if out.exists() and (out / "config.yaml").is_file():  # an earlier profile of ours: start clean
            shutil.rmtree(out)
        world = out.parent / "world"
        if world.is_dir() and not (out / "world").exists():  # the same world, not generated again
            shutil.copytree(world, out / "world")
    dist.barrier()
    if trace:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            run(cfg)
        Path(trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(trace) / f"trace_rank{dist.rank()}.json"))
    else:
        run(cfg)
    if not dist.is_main():
        return ""
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("stage") == name and "time/step" in r]
    report = format_profile(rows, name, _peak_flops(), stage_of(cfg, name).rollout().async_)
    (out / "profile.json").write_text(json.dumps(rows, indent=1) + "\n")
    return report


def format_profile(rows: list[dict], name: str, peak: float | None, overlapped: bool) -> str:
    head = ["step", *(p for p, _ in PHASES), "total s", "samples/s", "tokens/s", "hidden"]
    if peak:
        head.append("MFU")
    lines = [f"{name}: {len(rows)} steps (s per phase)", "  " + "  ".join(f"{h:>9}" for h in head)]

    def cells(r: dict) -> list[str]:
        c = [f"{r['step']:>9}", *(f"{r.get(k, 0.0):9.3f}" for _, k in PHASES), f"{r['time/step']:9.3f}",
             f"{r['samples_per_s']:9.1f}", f"{r.get('rollout/tokens', 0.0) / r['time/step']:9.0f}",
             f"{r['rollout/hidden_fraction']:9.2f}" if "rollout/hidden_fraction" in r else f"{'-':>9}"]
        if peak:
            c.append(f"{r.get('update/flops', 0.0) / max(r['time/update'], 1e-9) / peak:9.1%}")
        return c

    for r in rows:
        lines.append("  " + "  ".join(cells(r)))
    steady = rows[1:] if len(rows) > 1 else rows  # the first step carries start-up (compilation, caches)
    if steady:
        med = {k: statistics.median(r.get(k, 0.0) for r in steady) for _, k in PHASES}
        total = statistics.median(r["time/step"] for r in steady)
        share = ", ".join(f"{p} {med[k] / total:.0%}" for p, k in PHASES)
        lines.append(f"median over steps {steady[0]['step']}-{steady[-1]['step']}: {total:.3f} s/step ({share}); "
                     f"{statistics.median(r['samples_per_s'] for r in steady):.1f} samples/s, "
                     f"{statistics.median(r.get('rollout/tokens', 0.0) / r['time/step'] for r in steady):.0f} "
                     "tokens/s")
        hidden = [r["rollout/hidden_fraction"] for r in steady if "rollout/hidden_fraction" in r]
        if hidden:
            lines.append(f"generation hidden behind the update: {statistics.median(hidden):.0%} (median; "
                         f"rollout.async={str(overlapped).lower()})")
    return "\n".join(lines)
