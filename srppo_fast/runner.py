"""Runs a config's stages in order: prepares the output directory, the world, the shared context."""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import dist
from .checks import Preflight, preflight, resolved_config_text, stage_fingerprint, uses_world
from .config import Config, resolved_engine
from .engine import EngineBase, autocast, frozen_model, release_frozen, resolve_device, resolve_precision, save_engines
from .engine.placement import Placement, cast_parameters_, measured_param_bytes, placement
from .errors import CheckpointError, ConfigError, SrppoError
from .io import atomic_write_text, recover_tree
from .lock import RunLock, RunLockedError, lock_holder, watch_launcher
from .metrics import MetricsLog, NullMetricsLog
from .modelcard import add_eval_to_cards, model_card
from .modeling import (
    build_scratch_model,
    checkpoint_info,
    load_model,
    load_reward_model,
    load_tokenizer,
    model_source,
    num_parameters,
    tokenizer_fingerprint,
    tokenizer_mismatch,
)
from .roles import load_merged, resolve
from .stages import samplers, stage_of

log = logging.getLogger("srppo_fast")


@dataclass
class LoadedModel:
    stage: str
    role: str  # as the memory plan names it: model, actor, critic, frozen <ref>
    model: weakref.ref
    param_bytes: int  # its parameters' bytes on this rank, measured when it was placed


@dataclass
class RunContext:
    """What every stage shares: the config, the output directory, the device, the metrics log."""

    cfg: Config
    out: Path
    device: torch.device
    precision: str
    metrics: MetricsLog
    world_dir: str | None
    engine_kind: str = "torch"  # runtime.engine, resolved
    stage: str = ""  # the stage running now
    loaded: list = field(default_factory=list, repr=False)  # LoadedModel: every model a stage placed
    owned: list = field(default_factory=list, repr=False)  # the running stage's engines and frozen models
    bases: dict = field(default_factory=dict, repr=False)  # the running stage's shared LoRA bases (roles.py)
    _tokenizer: object = field(default=None, repr=False)
    _checked: dict = field(default_factory=dict, repr=False)

    def checkpoint_dir(self, stage: str) -> Path:
        return self.out / "checkpoints" / stage

    def vllm_context(self) -> int:
        """The longest prompt + response of the run's stages that sample with vLLM: the context of its sampler."""
        return max(stage_of(self.cfg, name).longest_sample() for name, ro in samplers(self.cfg).items()
                   if ro.engine == "vllm")

    def fingerprint(self, name: str) -> dict:
        """What the stage's result depends on (checks.stage_fingerprint): saved with its checkpoints."""
        return stage_fingerprint(self.cfg, name)

    def save_checkpoint(self, name: str, engines: dict, step: int, complete: bool, fingerprint: dict,
                        state: dict | None = None, **info) -> None:
        """A stage's checkpoint after `step` (engine.save_engines: the first engine's model, the others in
        subdirectories by label), its model card, and `state` for a resumable one; `info` joins the marker."""
        info = {"stage": name, "step": step, "complete": complete, "fingerprint": fingerprint, **info}
        self.metrics.flush()
        save_engines(self.checkpoint_dir(name), engines, self.tokenizer(), info, None if complete else state,
                     card=self.model_card(name, info))

    def model_card(self, name: str, info: dict) -> str:
        """The README.md a stage's checkpoint carries (modelcard.py)."""
        return model_card(self, name, info)

    def add_eval_to_cards(self, results: dict) -> list[Path]:
        """The eval stage's rows, into the cards of the evaluated stages' checkpoints."""
        return add_eval_to_cards(self, results)

    def tokenizer_spec(self) -> str:
        spec = self.cfg.model.tokenizer
        if spec == "auto":
            spec = "world" if self.cfg.model.base == "scratch" else self.cfg.model.base
        if spec == "world":
            return os.path.join(self.world_dir, "tokenizer")
        return spec

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_spec(), trust_remote_code=self.cfg.model.trust_remote_code)
        return self._tokenizer

    def model_path(self, ref: str) -> str:
        """Where the weights named `ref` live: 'base' (model.base; 'scratch' for a fresh model), a stage of
        this run (its complete checkpoint), or a directory / hub name as given."""
        if ref == "base":
            return self.cfg.model.base
        if self.cfg.is_stage(ref):
            path = self.checkpoint_dir(ref)
            info = checkpoint_info(path)
            if info is None or not info.get("complete"):
                raise CheckpointError(f"stage '{ref}' has no complete checkpoint in {path}; run that stage first.")
            return str(path)
        return ref

    def check_models(self, stage: str, refs: dict[str, str]) -> None:
        """Every model a stage reads must use the run's tokenizer: the same vocabulary (token -> id) and special
        tokens, and an embedding that covers every id. `refs` maps a config key to a model reference."""
        from transformers import AutoConfig

        run_tok = self.tokenizer()
        want = tokenizer_fingerprint(run_tok)
        for key, ref in refs.items():
            path = self.model_path(ref)
            if path == "scratch":
                continue
            if path not in self._checked:
                try:
                    tok = load_tokenizer(path, trust_remote_code=self.cfg.model.trust_remote_code)
                except SrppoError:
                    tok = None  # a model directory without tokenizer files: its vocabulary size is still checked
                source, extra = model_source(resolve(self, ref).base)
                self._checked[path] = (tokenizer_fingerprint(tok) if tok is not None else None,
                                       AutoConfig.from_pretrained(
                                           source, trust_remote_code=self.cfg.model.trust_remote_code, **extra))
            found, hf_config = self._checked[path]
            differs = tokenizer_mismatch(found, want) if found is not None else None
            if differs:
                raise ConfigError(f"{stage}: {key} ('{path}') has a different tokenizer from the run's "
                                  f"('{self.tokenizer_spec()}'): {differs}. Every model of a run must share one "
                                  f"tokenizer; point {key} at a model trained with it.")
            vocab = getattr(hf_config, "vocab_size", None) or getattr(getattr(hf_config, "text_config", None),
                                                                      "vocab_size", None)
            if vocab is not None and vocab < len(run_tok):
                raise ConfigError(f"{stage}: {key} ('{path}') has a vocabulary of {vocab} ids but the run's tokenizer "
                                  f"('{self.tokenizer_spec()}') has {len(run_tok)}; they must share one tokenizer.")

    def placement(self, trainable: bool) -> Placement:
        """Where a trainable or frozen model of this run lives and in which dtype (engine/placement.py): the
        decision the loaders, the engines and the --dry-run memory plan share."""
        ds = self.cfg.deepspeed
        return placement(self.precision, self.engine_kind, trainable=trainable, zero_stage=ds.zero_stage,
                         shard_frozen=ds.shard_frozen)

    def autocast(self):
        """The compute-precision context of a forward outside any engine (eval's models)."""
        return autocast(self.device, self.precision)

    def track(self, stage: str, role: str, model: torch.nn.Module) -> torch.nn.Module:
        """Note a model a stage placed (its parameter bytes on this rank, and a weak reference): what
        `loaded` lists is what the memory plan is checked against and what must be gone after the stage."""
        self.loaded.append(LoadedModel(stage, role, weakref.ref(model), measured_param_bytes(model)))
        return model

    def load_frozen(self, stage: str, ref: str, kind: str = "causal_lm", *, shard: bool = True) -> torch.nn.Module:
        """A model that only runs forwards (pi_SFT, pi_PT, the KL reference, a reward model, eval's models),
        loaded in the run's precision and placed on this rank: sharded under ZeRO-3 with shard_frozen unless
        `shard` is false (eval runs on rank 0 alone: a whole copy there)."""
        place = self.placement(trainable=False)
        path = self.model_path(ref)
        if kind == "sequence_classification":
            model = load_reward_model(path, self.cfg.model, dtype=place.param_dtype)
        elif path == "scratch":
            model = cast_parameters_(build_scratch_model(self.cfg.model, self.tokenizer(), self.cfg.seed),
                                     place.param_dtype)
        else:  # a LoRA stage's adapter: merged into a private copy of its base
            model = load_merged(self, ref, place.param_dtype)
        placed = frozen_model(self, model) if shard else model.to(self.device).eval().requires_grad_(False)
        if "_srppo_deepspeed_engine" in placed.__dict__:  # a ZeRO-3 shard: its engine is torn down with the stage
            self.owned.append(placed)
        return self.track(stage, f"frozen {ref}", placed)

    def release_stage(self) -> None:
        """The stage is over, however it ended: close its engines and tear down the DeepSpeed engines that shard
        its frozen models (both idempotent: the stages close theirs on success), then free the memory."""
        owned, self.owned = self.owned, []
        self.bases = {}
        for thing in owned:
            if isinstance(thing, EngineBase):
                thing.close()
            else:
                release_frozen(thing)
        del owned
        release_memory()

    def init_model(self, init: str):
        """A trainable model's starting weights, in fp32 (its engine keeps them as the master weights and casts
        the module to the run's precision)."""
        path = self.model_path(init)
        if path == "scratch":
            model = build_scratch_model(self.cfg.model, self.tokenizer(), self.cfg.seed)
        else:
            model = load_model(path, self.cfg.model)
        log.info("model from %s: %s, %.2fM parameters", init if path == "scratch" else path,
                 type(model).__name__, num_parameters(model) / 1e6)
        return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(out: Path) -> None:
    """Rank 0 logs to stderr and train.log; the other ranks log warnings and errors to stderr, tagged."""
    root = logging.getLogger("srppo_fast")
    main = dist.is_main()
    root.setLevel(logging.INFO if main else logging.WARNING)
    for h in list(root.handlers):
        root.removeHandler(h)
    tag = "" if dist.world_size() == 1 else f"[rank {dist.rank()}] "
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if main:
        handlers.append(logging.FileHandler(out / "train.log", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False


def prepare(cfg: Config, checks: Preflight) -> RunContext:
    """Steps before the first stage, once every check has passed: output dir, resolved config, logging,
    recovery of interrupted saves, world, device. Rank 0 writes; the other ranks wait for it."""
    from .world import build_world

    out = Path(cfg.output_dir)
    main = dist.is_main()
    device = resolve_device(cfg.runtime.device)
    if device.type == "cuda" and dist.world_size() > 1:
        device = torch.device("cuda", dist.local_rank())
    error = None
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.yaml", resolved_config_text(cfg))
        except OSError as e:
            error = e
    dist.first_error(error)
    setup_logging(out)
    engine = resolved_engine(cfg)
    log.info("srppo-fast: run in %s (stages: %s; %s engine, %d process%s)", out, ", ".join(cfg.stages), engine,
             dist.world_size(), "es" if dist.world_size() > 1 else "")
    error = None
    if main:
        try:
            for did in recover_tree(out / "checkpoints") + recover_tree(out, {"world"}):
                log.warning("%s", did)
            if uses_world(cfg):
                build_world(cfg.world, out / "world")
        except (OSError, SrppoError) as e:
            error = e
    dist.first_error(error)
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    world_dir = str(out / "world") if uses_world(cfg) else None
    if world_dir:
        log.info("embedded world in %s", world_dir)
    precision = resolve_precision(cfg.runtime.precision, device)
    log.info("device %s, precision %s, %d CPU threads", device, precision, torch.get_num_threads())
    if main:
        from .tracking import make_trackers

        metrics = MetricsLog(out / "metrics.jsonl", make_trackers(cfg, out))
    else:
        metrics = NullMetricsLog()
    return RunContext(cfg, out, device, precision, metrics, world_dir, engine_kind=engine)


def run(cfg: Config) -> RunContext:
    """1. check everything (nothing is written when a check fails) -> 2. prepare the output directory ->
    3. run each stage in order; stages completed by the same config and data are skipped."""
    if resolved_engine(cfg) == "deepspeed" or dist.launched():
        # a rank waiting in a collective for a rank whose sampler hangs must outlast that sampler's timeout
        sampler_timeouts = [ro.timeout_s for ro in samplers(cfg).values()]
        dist.init(resolve_device(cfg.runtime.device), max([30, *(math.ceil(t / 60) + 5 for t in sampler_timeouts)]))
    watch_launcher()  # launched workers stop (saving first) when their launcher is gone
    out = Path(cfg.output_dir)
    error = None
    if dist.is_main() and (holder := lock_holder(out)) is not None:  # refused at once, before the checks
        error = RunLockedError(f"output_dir {out} is in use by another run ({holder}); wait for it to finish or "
                               "stop it, or give this run another output_dir.")
    dist.first_error(error)
    checks = preflight(cfg)
    lock = RunLock(out) if dist.is_main() else None  # the whole launch holds it through rank 0
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except RunLockedError as e:
            error = e
    dist.first_error(error)
    try:
        return _run_stages(cfg, checks)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(cfg: Config, checks: Preflight) -> RunContext:
    dist.barrier()  # every rank has checked before rank 0 writes
    ctx = prepare(cfg, checks)
    failed = True
    try:
        for index, name in enumerate(cfg.stages):
            status = checks.statuses[name]
            if status.action == "skip":
                log.info("stage %s: already complete in %s, skipped", name, ctx.checkpoint_dir(name))
                continue
            seed_everything(cfg.seed + 1000 * index)
            log.info("stage %d/%d: %s", index + 1, len(cfg.stages), name)
            ctx.stage = name
            try:
                stage = stage_of(cfg, name)
                if stage.whole_models_on_rank0:  # plain models, no engine: rank 0 runs it, the others wait for it
                    if dist.is_main():
                        stage.run(ctx)
                        ctx.metrics.end_stage(name)
                    if index + 1 < len(cfg.stages):
                        dist.barrier()
                    continue
                stage.run(ctx)
                ctx.metrics.end_stage(name)
            finally:
                ctx.release_stage()  # its models, optimizers and engines, before the next stage loads its own
        failed = False
    finally:
        ctx.metrics.close(failed)  # the trackers' last records (a killed or failed run: up to its last step)
    log.info("done: %s", summary(ctx))
    return ctx


def release_memory() -> None:
    """Free what a finished stage held: its modules, optimizers and engines are unreferenced once it returns
    (each stage closes its engines), but DeepSpeed's hooks and autograd's graphs hold them in reference cycles
    that only the collector breaks; then the CUDA caching allocator gives the freed blocks back, so the next
    stage's models (and a vLLM sampler that measures free memory) see them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summary(ctx: RunContext) -> str:
    """One line per stage: where its checkpoint is and what its held-out loss did."""
    parts = []
    for name in ctx.cfg.stages:
        if not ctx.cfg.makes_model(name):
            parts.append(stage_of(ctx.cfg, name).outcome(ctx))
            continue
        info = checkpoint_info(ctx.checkpoint_dir(name)) or {}
        start, end = info.get("eval_loss_start"), info.get("eval_loss_end")
        loss = f", held-out loss {start:.4f} -> {end:.4f}" if start is not None and end is not None else ""
        parts.append(f"{name} ({info.get('step', '?')} steps{loss})")
    return "; ".join(parts) + f"; checkpoints in {ctx.out / 'checkpoints'}"


def describe_plan(cfg: Config, checks: Preflight | None = None) -> str:
    """The stages a config will run, one line each, with what the run would do with each and what the
    checks found (for --dry-run)."""
    lines = [f"plan (output_dir: {cfg.output_dir}):"]
    for i, name in enumerate(cfg.stages, 1):
        line = stage_of(cfg, name).plan_line()
        status = checks.statuses[name] if checks else None
        if status is not None and status.action != "start":
            line += " [complete: skipped]" if status.action == "skip" else f" [resumes after step {status.step}]"
        lines.append(f"  {i}. {line}")
    if checks:
        lines.append("checks:")
        holder = lock_holder(cfg.output_dir)
        lines += [f"  - {c}" for c in [f"output_dir '{cfg.output_dir}' is writable" if holder is None else
                                       f"output_dir '{cfg.output_dir}' is IN USE by another run ({holder}): a run "
                                       "now would be refused", *checks.checks]]
    # the plan is for GPUs: shown unless the run is on the CPU (said so, or a scratch model where none is visible)
    on_cpu = cfg.runtime.device == "cpu" or (cfg.runtime.device == "auto" and cfg.model.base == "scratch"
                                             and not torch.cuda.is_available())
    if resolved_engine(cfg) == "deepspeed" or not on_cpu:
        from .engine.memory import describe_memory

        lines.append(describe_memory(cfg))
    return "\n".join(lines)
