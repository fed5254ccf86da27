"""Loading a run configuration: the YAML file (strictly: duplicate keys and alias bombs refused), dotted
`key=value` overrides, the typed build into config.py's dataclasses with one-line errors, the named stage sections,
and validation (each stage's section by its kind in stages/, the machine by machine.py)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from . import machine
from .config import STAGE_TYPES, Config, _type_name, config_key, optional_section, shown
from .errors import ConfigError
from .io import read_text_file
from .stages import KINDS, samplers, stage_of


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {shown(value)} is not allowed; use {_type_name(tp)}.")
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of its fields, got {shown(value)}.")
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, str):  # YAML reads `1e3` as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: {shown(value)} is not a finite number; give a finite value.")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list:
        if isinstance(value, str):  # `stages=pretrain,sft` on the command line
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {shown(value)} ({type(value).__name__}).")


def _check_bounds(f: dataclasses.Field, value: Any, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    m = f.metadata
    for bound, ok, word in (("gt", lambda v, b: v > b, "greater than"), ("ge", lambda v, b: v >= b, "at least"),
                            ("lt", lambda v, b: v < b, "less than"), ("le", lambda v, b: v <= b, "at most")):
        b = m.get(bound)
        if b is not None and not ok(value, b):
            raise ConfigError(f"{key}: {shown(value)} is out of range; it must be {word} {b:g}.")


def build(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a plain dict on top of `base` (default: the class defaults),
    rejecting unknown keys and wrong types. Sections merge, so a partial section keeps its defaults."""
    obj = copy.deepcopy(base) if base is not None else cls()
    hints = typing.get_type_hints(cls)
    fields = {config_key(f.name): f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else \
                f"known keys here: {', '.join(fields)}."
            raise ConfigError(f"unknown config key '{where}': {hint} (see `srppo-fast config` for the reference)")
    for key_name, value in data.items():
        key = f"{prefix}.{key_name}" if prefix else key_name
        name = fields[key_name].name
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and value is None:
            continue  # an empty section (`ppo_rm:` with its keys commented out) keeps its defaults
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            setattr(obj, name, build(tp, value, key, base=getattr(obj, name)))
        elif tp is dict and isinstance(value, dict):
            setattr(obj, name, _merge_dict(getattr(obj, name), value))
        else:
            value = _convert(tp, value, key)
            _check_bounds(fields[key_name], value, key)
            setattr(obj, name, value)
    return obj


def _merge_dict(base: dict, value: dict) -> dict:
    """A mapping field (model.arch) given in part: its keys update the default, so `model.arch.hidden_size=64`
    keeps the rest of the architecture; naming another `model_type` starts from that type's own defaults."""
    if "model_type" in value and value.get("model_type") != base.get("model_type"):
        return dict(value)
    return {**base, **value}


def _section_type(cls: Any, name: str) -> Any:
    """The type of field `name` of dataclass `cls` (None when unknown: `build` reports it)."""
    if not dataclasses.is_dataclass(cls):
        return None
    tp = typing.get_type_hints(cls).get(name)
    return optional_section(tp) or tp


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few kilobytes; a megabyte is not a config


MAX_CONFIG_NODES = 100_000  # values after YAML aliases are expanded


class _StrictLoader(yaml.SafeLoader):
    """YAML as a config means it: a key twice in one mapping is an error naming both lines (plain YAML keeps the
    last silently: a second `pretrain:` drops the whole first section), and aliases may not expand the document
    beyond MAX_CONFIG_NODES values (a billion-laughs bomb is refused before anything walks it). Merge keys
    (`<<: *sft`) stay: a key given beside a merge overrides the merged one, as YAML says."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"config file '{self.name}': key '{key}' appears twice in one mapping (lines "
                                      f"{seen[key]} and {line}); YAML would silently keep only the second, so "
                                      "merge them into one.")
                seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(node, memo: dict) -> int:
    """How many values `node` stands for with every alias expanded (each distinct node counted once per use)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once: it cannot be expanded anyway
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def parse_yaml_config(text: str, path: str):
    """The config file's YAML, strictly (see _StrictLoader), or one ConfigError naming the line."""
    if len(text.encode("utf-8", errors="replace")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file '{path}' is larger than {MAX_CONFIG_BYTES >> 20} MiB, which no config is; "
                          "give the YAML config of a run.")
    loader = _StrictLoader(text)
    loader.name = path
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_CONFIG_NODES:
            raise ConfigError(f"config file '{path}' expands to {size:,} values once its YAML aliases are resolved "
                              f"(more than {MAX_CONFIG_NODES:,}: aliases nested in aliases?); write the values out.")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: "
                          f"{getattr(e, 'problem', None) or e}; fix the syntax there.") from None
    finally:
        loader.dispose()


def apply_override(raw: dict, item: str, schema: type = None) -> None:
    """Apply one `dotted.key=value` override (the value is parsed as YAML) to the raw config dict."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. sft.optim.lr=5e-5.")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key; write it like sft.optim.lr=5e-5.")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node, tp = raw, schema or Config
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        tp = _section_type(tp, part) if tp is not dict else dict
        child = node.get(part)
        is_value = tp is not None and tp is not dict and not dataclasses.is_dataclass(tp)
        if is_value or (child is not None and not isinstance(child, dict)):
            raise ConfigError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is a value, not a section.")
        if child is None:
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def load_config(path: str | None, overrides: list[str] = (), *, check_files: bool = True) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, build and validate."""
    raw: dict = {}
    if path is not None:
        text = read_text_file(path, "config file", "pass an existing YAML file to --config (e.g. "
                              "configs/quickstart.yaml).", ConfigError)
        raw = parse_yaml_config(text, path)
        if raw is None:
            raise ConfigError(f"config file '{path}' is empty; list the stages and settings of a run (see "
                              "configs/quickstart.yaml), or write {} to mean every default.")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections at the top level, "
                              f"not a {type(raw).__name__}.")
    for item in overrides:
        apply_override(raw, item)
    cfg = build_config(raw)
    validate(cfg, check_files=check_files)
    return cfg


STAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def build_config(raw: dict) -> Config:
    """`Config` from the raw mapping: the schema's sections, then each section of the config's own name that
    declares a stage type (`kind: srppo`), built on the config's section of that type (its defaults and what the
    config sets there), so a sweep writes only what differs."""
    fields = {config_key(f.name) for f in dataclasses.fields(Config)}
    named = {key: value for key, value in raw.items()
             if key not in fields and isinstance(value, dict) and "kind" in value}
    for key, value in raw.items():
        if key in fields and key in STAGE_TYPES and isinstance(value, dict) and "kind" in value:
            raise ConfigError(f"{key}.kind: '{key}' is a stage type's own section, which takes no kind; to run a copy "
                              f"of it, give the copy another name (e.g. {key}_2: {{kind: {key}}}).")
        if key not in fields and key not in named and isinstance(value, dict):
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{key}': {hint}A section of your own name is a stage only with a "
                              f"stage type: add `kind:` (one of {', '.join(STAGE_TYPES)}) to it. (See `srppo-fast "
                              "config` for the reference.)")
    cfg = build(Config, {k: v for k, v in raw.items() if k not in named})
    for name, value in named.items():
        kind = value["kind"]
        if not isinstance(name, str) or not STAGE_NAME.fullmatch(name) or name == "base":
            raise ConfigError(f"stage section {shown(name)}: a stage's name starts with a letter and holds letters, "
                              "digits, '_' and '-' only (it names a checkpoint directory), and is not 'base'; "
                              "rename it.")
        kinds = {k.kind: k for k in KINDS}
        if kind in STAGE_TYPES:  # a copy of the config's section of that type
            base, label, makes_model = getattr(cfg, kind), STAGE_TYPES[kind]["label"], STAGE_TYPES[kind]["makes_model"]
        elif kind in kinds:  # a kind's own defaults
            k = kinds[kind]
            base, label, makes_model = k.section_type(), k.label or kind, k.makes_model
        else:
            known = [*STAGE_TYPES, *(k for k in kinds if k not in STAGE_TYPES)]
            close = difflib.get_close_matches(str(kind), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(known)}."
            raise ConfigError(f"{name}.kind: {shown(kind)} is not a stage type; {hint}")
        data = {k: v for k, v in value.items() if k != "kind"}
        cfg.named[name] = (kind, build(type(base), data, name, base=base), label, makes_model)
    return cfg


def validate(cfg: Config, *, check_files: bool = True) -> None:
    """Cross-field checks: the options that contradict each other, and the files that must exist. Each stage's
    section is checked by its kind (stages/); what this machine has, by machine.py."""
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir is empty; name the directory the run writes to, e.g. output_dir=runs/my-run.")
    known = [*STAGE_TYPES, *cfg.named]
    seen: list[str] = []
    for name in cfg.stages:
        if not isinstance(name, str) or not cfg.is_stage(name):
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known stages: {', '.join(known)}."
            raise ConfigError(f"stages: unknown stage {name!r}; {hint} (A section of your own name with `kind: "
                              "<stage type>` is a stage too.)")
        if name in seen:
            raise ConfigError(f"stages: '{name}' is listed twice; list each stage once (a second stage of the same "
                              f"type needs its own name: a section with `kind: {cfg.stage_type(name)}`).")
        seen.append(name)
    if not cfg.stages:
        raise ConfigError("stages is empty; list at least one stage, e.g. stages=[pretrain,sft].")
    for i, name in enumerate(cfg.stages):
        stage_of(cfg, name).validate(cfg.stages[:i], check_files)

    if cfg.model.base == "scratch" and "model_type" not in cfg.model.arch:
        raise ConfigError("model.arch needs a model_type (e.g. llama) to build a 'scratch' model.")
    if cfg.model.tokenizer == "world" and cfg.model.base != "scratch":
        raise ConfigError(f"model.tokenizer is 'world' but model.base '{cfg.model.base}' is a pretrained model with "
                          "its own vocabulary; set model.tokenizer=auto.")
    if cfg.model.attn_implementation == "flash_attention_2" and cfg.runtime.device == "cpu":
        raise ConfigError("model.attn_implementation is 'flash_attention_2', which runs on CUDA only, but "
                          "runtime.device is 'cpu'; use varlen_sdpa (the default) on the CPU.")
    machine.check_config(cfg, samplers(cfg))
