"""Everything a run checks before it writes anything (`preflight`), and what a stage's result depends on.

A run that will be refused, or whose config, data or models are wrong, stops here and leaves
`output_dir` exactly as it was. `preflight` decides, for each stage, whether it is complete (skipped),
interrupted (resumed from its last save) or to be started, reading only; `--dry-run` runs the same
checks and prints what they found.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import machine
from .config import Config, is_gguf, resolved_engine, resolved_precision, to_dict
from .errors import CheckpointError, ConfigError, DataError
from .io import effective_dir, manifest_problem
from .stages import samplers, stage_of
from .state import describe_changes

log = logging.getLogger("srppo_fast")
CONFIG_HEADER = ("# srppo-fast: the resolved config of this run. Written by srppo-fast; edit your own config, "
                 "not this.\n")


def resolved_config_text(cfg: Config) -> str:
    """OUTPUT_DIR/config.yaml: the header, then every key of `cfg` (also in each model card and TensorBoard)."""
    import yaml

    return CONFIG_HEADER + yaml.safe_dump(to_dict(cfg), sort_keys=False)


FULL_HASH_BYTES = 256 << 20  # data files up to this size are hashed whole; larger ones by their ends


# ---------------------------------------------------------------------------------------------
# what a stage's result depends on


@functools.lru_cache(maxsize=256)
def _file_fingerprint(path: str, size: int, mtime_ns: int, inode: int) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
            return {"size": size, "sha256": h.hexdigest()}
        h.update(fh.read(8 << 20))
        fh.seek(size - (8 << 20))
        h.update(fh.read(8 << 20))
    # a big file: its ends and its modification time (hashing gigabytes on every start costs seconds)
    return {"size": size, "sha256_ends": h.hexdigest(), "mtime_ns": mtime_ns}


def data_fingerprint(spec: str) -> dict | None:
    """Size and content hash of a data file, or of every file of a dataset directory; None for world splits
    (the world's config stands for them) and hub datasets (only the name is known before loading)."""
    if spec.startswith(("world:", "hf:")):
        return None
    files = [spec] if os.path.isfile(spec) else sorted(
        os.path.join(d, n) for d, _, names in os.walk(spec) for n in names) if os.path.isdir(spec) else []
    out = {}
    for file in files:
        try:
            st = os.stat(file)
            out[os.path.relpath(file, spec) if file != spec else "."] = _file_fingerprint(
                file, st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError as e:
            raise DataError(f"data file '{file}' cannot be read ({e.strerror}); check the path and its "
                            "permissions.") from None
    return out


def uses_world(cfg: Config) -> bool:
    tokenizer = cfg.model.tokenizer
    specs = ["world" if tokenizer == "auto" and cfg.model.base == "scratch" else tokenizer]
    for name in cfg.stages:
        specs += stage_of(cfg, name).data_specs()
    return any(s == "world" or s.startswith("world:") for s in specs)


# What makes a finished stage "the same": every key that changes the trained weights beyond floating-point
# rounding. runtime.precision does (fp32 and bf16 train different models), and so do the stage's section (but when
# it logs, evaluates or saves), the model (but how attention and checkpointing compute the same thing), the seed,
# the world and the data. How the same maths is computed does not: runtime.engine, the deepspeed section (ZeRO
# stage, offload), the number of processes, model.attn_implementation, model.gradient_checkpointing, the kernels'
# implementation (SRPPO_FAST_IMPL), threads; each is parity-tested to rounding (tests/test_deepspeed.py,
# test_packed_forward.py, test_impl_parity.py). A resumable checkpoint is refused by another engine all the same:
# its optimizer state is the engine's own (stage_status).
_NOT_RESULTS = {"save_every", "log_every", "eval_every"}
_MODEL_NOT_RESULTS = {"attn_implementation", "gradient_checkpointing"}


def _result_keys(section: dict, skip: set = _NOT_RESULTS) -> dict:
    return {k: v for k, v in section.items() if k not in skip}


def stage_fingerprint(cfg: Config, name: str) -> dict:
    """What a stage's result depends on: its section, the model, the world, the seed, its data files'
    contents, and the fingerprints of the stages whose models it reads."""
    fp: dict = {}
    data: dict = {}
    stage = stage_of(cfg, name)
    for ref in stage.model_refs():
        if ref in cfg.stages and ref != name:
            upstream = stage_fingerprint(cfg, ref)
            data.update(upstream.pop("data", {}))
            fp.update(upstream)
    section = to_dict(cfg.section(name))
    if name in cfg.named:  # a named stage: its type counts too
        section = {"kind": cfg.stage_type(name), **section}
    model = _result_keys(to_dict(cfg.model), _MODEL_NOT_RESULTS)
    if not stage.trains_adapters():
        model.pop("lora", None)  # full weights: model.lora does not change this stage's result
    fp.update({name: _result_keys(section), "model": model,
               "seed": cfg.seed, "precision": resolved_precision(cfg)})
    if uses_world(cfg):
        fp["world"] = to_dict(cfg.world)
    for spec in stage.data_specs():
        found = data_fingerprint(spec)
        if found is not None:
            data[spec] = found
    if data:
        fp["data"] = data
    return fp


# ---------------------------------------------------------------------------------------------
# stage status


@dataclass
class StageStatus:
    """What the run will do with a stage: 'skip' (complete), 'resume' (from `step`) or 'start'."""

    name: str
    action: str
    step: int = 0
    fingerprint: dict = field(default_factory=dict, repr=False)


def stage_status(cfg: Config, name: str) -> StageStatus:
    """Read the stage's checkpoint (or the copy an interrupted save left) and decide; refuse one made by a
    different config or data, naming what changed."""
    from .modeling import checkpoint_info

    want = stage_fingerprint(cfg, name)
    if not stage_of(cfg, name).resumable:
        return StageStatus(name, "start", fingerprint=want)
    path = Path(cfg.output_dir) / "checkpoints" / name
    source = effective_dir(path)
    if source is None:
        return StageStatus(name, "start", fingerprint=want)
    info = checkpoint_info(source)
    if info is None:
        raise CheckpointError(f"{path} exists but is not an srppo-fast checkpoint (no srppo_checkpoint.json), so it "
                              "will not be overwritten; move it away or use another output_dir.")
    damage = manifest_problem(source)
    if damage is not None:  # found before anything loads it (a reader's traceback otherwise)
        raise CheckpointError(f"the checkpoint {source} is damaged: {damage} (cut short by a copy or a disk error?); "
                              f"restore that file, or delete {path} to redo the stage.")
    complete = bool(info.get("complete"))
    if not complete and not (source / "trainer_state.pt").is_file():
        return StageStatus(name, "start", fingerprint=want)  # an unfinished save without state: start over
    if not complete:  # its optimizer state is its engine's own: another engine cannot take it over
        saved = "deepspeed" if (source / "deepspeed").is_dir() else "torch"
        if saved != resolved_engine(cfg):
            raise CheckpointError(f"{path} was saved by the {saved} engine but this run uses the "
                                  f"{resolved_engine(cfg)} engine (runtime.engine); resume with "
                                  f"runtime.engine={saved}, "
                                  "or delete that checkpoint to start the stage over.")
    if info.get("fingerprint") != want:
        what = "a finished run" if complete else "an unfinished run"
        raise CheckpointError(f"{path} holds {what} of a different config (changed: "
                              f"{describe_changes(info.get('fingerprint'), want)}); use a new output_dir, or delete "
                              "that checkpoint to redo the stage.")
    return StageStatus(name, "skip" if complete else "resume", int(info.get("step", 0)), want)


# ---------------------------------------------------------------------------------------------
# output directory


def is_our_config_yaml(path: Path) -> bool:
    """A config.yaml srppo-fast wrote (the header, or, from older versions, every top-level key of a resolved
    config)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if text.startswith(CONFIG_HEADER.split(".")[0]):
        return True
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    if not isinstance(raw, dict):
        return False
    keys = set(to_dict(Config()))
    extra = set(raw) - keys  # named stages: sections with a kind
    return keys <= set(raw) and all(isinstance(raw[k], dict) and "kind" in raw[k] for k in extra)


def check_output_dir(out: str) -> None:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir '{out}' is a file; give a directory (it is created when missing).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir '{out}' is not writable ('{existing}' does not let this user create files); "
                          "choose a directory you can write to.")
    config_yaml = path / "config.yaml"
    if config_yaml.exists() and not is_our_config_yaml(config_yaml):
        raise ConfigError(f"output_dir '{out}' holds a config.yaml that srppo-fast did not write (your own config "
                          "file?); it would be overwritten by the run's resolved config: use another output_dir.")
    world = path / "world"
    if world.exists() and not (world / "world.json").is_file():
        raise ConfigError(f"{world} exists but is not an embedded world srppo-fast wrote (no world.json), so it will "
                          "not be overwritten; move it away or use another output_dir.")


# ---------------------------------------------------------------------------------------------
# models, tokenizers, data (what --dry-run also prints)


def _local(ref: str) -> bool:
    return os.path.isdir(ref) or ref.startswith((".", "/", "~"))


def _check_model_path(path: str, key: str, trust_remote_code: bool) -> str:
    from transformers import AutoConfig

    from .adapters import adapter_base, is_adapter_dir
    from .modeling import gguf_config, model_source, resolve_model_spec

    if is_gguf(path):
        source, extra = model_source(path, convert=False)  # the file exists and transformers can read GGUF here
        file = resolve_model_spec(path)
        arch = gguf_config(path).model_type
        if extra:
            return f"{key}: GGUF file '{file}' ({arch}; dequantised into the cache when the run starts)"
        return f"{key}: GGUF file '{file}' ({arch}; its dequantised copy is cached in {source})"
    if not _local(path):
        try:
            AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
            return f"{key}: hub model '{path}' found in the local cache"
        except (OSError, ValueError):
            return (f"{key}: hub model '{path}' not checked (not in the local cache; it is downloaded when the run "
                    "starts)")
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: '{path}' does not exist; give a directory with a Hugging Face checkpoint.")
    if is_adapter_dir(path):  # a LoRA adapter: the model it sits on must be there and have its target layers
        base = adapter_base(path)
        _check_model_path(base, f"{key} (the base of the LoRA adapter '{path}')", trust_remote_code)
        _check_adapter_targets(path, base, key, trust_remote_code)
        return f"{key}: '{path}' is a LoRA adapter on '{base}'"
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: '{path}' is not a Hugging Face model directory ({str(e).splitlines()[0]}); give "
                          "a directory holding config.json and the weights.") from None
    return f"{key}: '{path}' holds a model config"


def _check_adapter_targets(path: str, base: str, key: str, trust_remote_code: bool) -> None:
    """The adapter's target_modules are linear layers of the model it sits on (its architecture on the meta device;
    not checked for a hub model outside the local cache)."""
    from transformers import AutoConfig

    from .adapters import adapter_json, model_linear_names, resolve_targets
    from .modeling import gguf_config

    try:
        hf_config = gguf_config(base) if is_gguf(base) else AutoConfig.from_pretrained(
            base, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        return
    targets = adapter_json(path).get("target_modules") or []
    if isinstance(targets, list):  # (a string is a regular expression to peft: not checked here)
        resolve_targets(model_linear_names(hf_config), targets,
                        f"{key}: the LoRA adapter '{path}' (target_modules in its adapter_config.json)")


def _check_tokenizer_path(path: str, trust_remote_code: bool) -> str:
    from .modeling import load_tokenizer

    if is_gguf(path):
        tok = load_tokenizer(path, trust_remote_code=trust_remote_code, convert=False)
        return f"model.tokenizer: the GGUF file '{path}' holds one ({len(tok)} tokens)"
    if not _local(path):
        return f"model.tokenizer: hub tokenizer '{path}' (loaded when the run starts)"
    if not os.path.isdir(path):
        raise ConfigError(f"model.tokenizer: '{path}' does not exist; give a directory with tokenizer files.")
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    return f"model.tokenizer: '{path}' loads ({len(tok)} tokens)"


def _check_data(spec: str, kind: str, key: str, final_answer: bool = False) -> str:
    """Every record of a data file or dataset directory, streamed (one record in memory at a time): it parses,
    holds what `kind` needs and valid text; with final_answer (SPIN) each conversation ends with the answer. The
    first problem is one DataError naming its file and line, before the run writes anything."""
    from .data import iter_raw, normalise

    if spec.startswith(("world:", "hf:")):
        return f"{key}: {spec} (not opened before the run)"
    seen = 0
    for where, obj in iter_raw(spec):
        record = normalise(obj, where, kind)
        if final_answer and record.messages and record.messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: SPIN needs conversations that end with the assistant's turn (the "
                            "demonstration it prefers to the model's own answer); this one ends with a "
                            f"{record.messages[-1]['role']} turn.")
        seen += 1
    if not seen:
        raise DataError(f"{key}: '{spec}' holds no records; give a file with one JSON object per line.")
    return f"{key}: '{spec}': all {seen} records parse and hold what the stage needs"


def check_inputs(cfg: Config) -> list[str]:
    """Models, tokenizer and data that exist before the run: each opens. Returns one line per check."""
    from .modeling import check_arch

    done = []
    if cfg.model.base == "scratch":
        check_arch(cfg.model)
        done.append(f"model.arch: every key is a field of the {cfg.model.arch['model_type']} config")
    else:
        done.append(_check_model_path(cfg.model.base, "model.base", cfg.model.trust_remote_code))
    if cfg.model.tokenizer not in ("auto", "world"):
        done.append(_check_tokenizer_path(cfg.model.tokenizer, cfg.model.trust_remote_code))
    done += _check_lora(cfg)
    seen = set()
    for name in cfg.stages:
        stage = stage_of(cfg, name)
        for ref in stage.model_refs():
            if ref == "base" or cfg.makes_model(ref) or ref in seen:
                continue
            seen.add(ref)
            done.append(_check_model_path(ref, f"{name} model", cfg.model.trust_remote_code))
        for key, path in stage.external_models().items():
            if path not in seen:
                seen.add(path)
                done.append(_check_model_path(path, key, cfg.model.trust_remote_code))
        for spec, kind, final_answer in stage.data_checks():
            done.append(_check_data(spec, kind, f"{name} data", final_answer=final_answer))
    return done


def _check_lora(cfg: Config) -> list[str]:
    """model.lora's target modules against the base's architecture (built on the meta device: no weights)."""
    lora = cfg.model.lora
    if lora is None:
        return []
    from .adapters import model_linear_names, resolve_targets
    from .engine.sizes import UnknownSize, hf_config_for

    stages = [name for name in cfg.stages if stage_of(cfg, name).trains_adapters()]
    if not stages:
        return ["model.lora: no stage trains adapters (each starts from a 'scratch' base or trains nothing)"]
    try:
        hf_config = hf_config_for(cfg, "base")
    except UnknownSize:
        return ["model.lora: target modules not checked (the base's architecture is read when the run starts)"]
    targets = resolve_targets(model_linear_names(hf_config), list(lora.target_modules))
    return [f"model.lora: rank {lora.rank} (alpha {lora.alpha:g}) adapters on {', '.join(targets)} for "
            f"{', '.join(stages)}"]


# ---------------------------------------------------------------------------------------------
# the whole check


@dataclass
class Preflight:
    statuses: dict[str, StageStatus]
    checks: list[str]


def preflight(cfg: Config, dry_run: bool = False) -> Preflight:
    """Every check that can be made without training, in an order that writes nothing: the output
    directory, the inputs, then each stage's checkpoint against this config. What this machine lacks stops
    a run; a dry run lists it and goes on."""
    from .world.build import check_world_config

    problems = machine.problems(cfg, samplers(cfg))
    if problems and not dry_run:
        raise ConfigError(problems[0])
    check_output_dir(cfg.output_dir)
    if uses_world(cfg):
        check_world_config(cfg.world)
    checks = [f"NOT ON THIS MACHINE: {p}" for p in problems] + check_inputs(cfg)
    statuses = {name: stage_status(cfg, name) for name in cfg.stages}
    return Preflight(statuses, checks)
