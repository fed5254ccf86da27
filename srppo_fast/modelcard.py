"""The README.md model card of every saved checkpoint: what the model is, what made it (base, stages, data
fingerprints, the resolved config), how it scored, and the command that reproduces it.

`model_card` is cheap (no model is loaded) and is written inside the checkpoint's atomic save;
`add_eval_to_cards` splices the eval stage's rows into the cards of the models it evaluated.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .checks import CONFIG_HEADER, stage_fingerprint, uses_world
from .config import MODEL_STAGES, STAGE_TYPES, Config, is_gguf, stage_data_specs, stage_model_refs, to_dict
from .evaluation import LABELS
from .io import MANIFEST, atomic_write_text

log = logging.getLogger("srppo_fast")
README = "README.md"
METRIC_ORDER = ("accuracy", "careful_rate", "loglik", "eos_rate", "length")
EVAL_START, EVAL_END = "<!-- srppo-fast:evaluation -->", "<!-- /srppo-fast:evaluation -->"


def _version() -> str:
    import srppo_fast

    version = getattr(srppo_fast, "__version__", None)
    if version:
        return version
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("srppo-fast")
    except PackageNotFoundError:
        return "unknown"


def _block(text: str, lang: str = "") -> str:
    """A fenced code block whose fence is longer than any backtick run inside `text`."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _yaml(obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def describe_stage(cfg: Config, name: str) -> str:
    """What kind of model a stage makes, in a few words."""
    section, kind = getattr(cfg, name), STAGE_TYPES[name]
    if kind == "lm":
        if section.loss_on == "all":
            return "causal language model (next-token loss on every token)"
        return f"supervised fine-tuning (SFT): next-token loss on the {section.loss_on} tokens of demonstrations"
    if kind == "spin":
        return "self-play fine-tuning (SPIN): DPO loss of the demonstrations against the model's own samples"
    if kind == "rl":
        if section.reward.type != "coherent":
            return f"PPO with the reward model '{section.reward.model_path}'"
        return (f"Self-Rewarding PPO: PPO with the coherent reward log pi_SFT(y|x) - log pi_PT(y|x) (pi_SFT: "
                f"`{section.reward.sft}`, pi_PT: `{section.reward.pretrained}`)")
    return kind


def lineage(cfg: Config, name: str) -> list[str]:
    """`name` and the stages of the run whose models it reads, directly or not, in run order."""
    seen = {name}
    todo = [name]
    while todo:
        for ref in stage_model_refs(cfg, todo.pop()):
            if ref in cfg.stages and ref not in seen:
                seen.add(ref)
                todo.append(ref)
    return [s for s in cfg.stages if s in seen]


def _reads(cfg: Config, name: str) -> str:
    parts = []
    for ref in stage_model_refs(cfg, name):
        if ref == "base":
            parts.append(f"the base (`{cfg.model.base}`)")
        elif ref in cfg.stages:
            parts.append(f"`{ref}`")
        elif ref in MODEL_STAGES:
            parts.append(f"`{ref}` (the checkpoint an earlier run left in this output_dir; see its own {README})")
        else:
            parts.append(f"the model `{ref}`")
    section = getattr(cfg, name)
    if STAGE_TYPES[name] == "rl" and section.reward.type == "model":
        parts.append(f"the reward model `{section.reward.model_path}`")
    return ", ".join(dict.fromkeys(parts))


def _fingerprint_cells(found: dict) -> list[tuple[str, str, str]]:
    """(file, bytes, hash) rows of one data spec's fingerprint (checks.data_fingerprint)."""
    rows = []
    for file, fp in found.items():
        digest = (f"sha256 `{fp['sha256']}`" if "sha256" in fp else
                  f"sha256 of the first and last 8 MiB `{fp.get('sha256_ends')}`, mtime_ns {fp.get('mtime_ns')}")
        rows.append((file, str(fp.get("size", "")), digest))
    return rows


def _data_section(cfg: Config, stages: list[str], data: dict) -> list[str]:
    lines = ["## Data", "", "| stage | data | file | bytes | fingerprint |", "|---|---|---|---|---|"]
    world = False
    for stage in stages:
        for spec in stage_data_specs(cfg, stage):
            if spec.startswith("world:"):
                world = True
                lines.append(f"| {stage} | `{_cell(spec)}` | split `{spec[6:]}` of the embedded world | | "
                             "the world's config (below) |")
            elif spec.startswith("hf:"):
                lines.append(f"| {stage} | `{_cell(spec)}` | hub dataset | | its name only |")
            else:
                rows = _fingerprint_cells(data.get(spec, {})) or [("", "", "not found")]
                lines += [f"| {stage} | `{_cell(spec)}` | {_cell(f)} | {b} | {h} |" for f, b, h in rows]
    if world and uses_world(cfg):
        lines += ["", "The `world:` splits are generated by srppo-fast's embedded task world (OUTPUT_DIR/world/, "
                  "deterministic in its config), this one:", "", _block(_yaml(to_dict(cfg.world)), "yaml")]
    return lines


def _metric(key: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if key == "loglik" else f"{value:.3f}"
    return _cell(value)


def eval_section(rows: dict, note: str) -> str:
    """The Evaluation section of one model's card (`rows`: split -> metrics, as in eval.json): one row per
    evaluation set, one column per metric, between the markers that `add_eval_to_cards` replaces."""
    found = [k for row in rows.values() for k in row]
    keys = list(dict.fromkeys([k for k in METRIC_ORDER if k in found] + found))
    lines = [EVAL_START, "## Evaluation", "", note, "",
             "| split | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for split, row in rows.items():
        lines.append(f"| {_cell(split)} | " + " | ".join(_metric(k, row[k]) if k in row else "n/a" for k in keys)
                     + " |")
    lines += ["", "accuracy: the verifier's, of greedy answers; careful_rate: share of careful answers; loglik: mean "
              "log-likelihood per token of the reference responses.", EVAL_END]
    return "\n".join(lines)


def _saved_eval(out: Path, name: str) -> str:
    """The Evaluation section from OUTPUT_DIR/eval.json when it holds `name`, else the empty markers."""
    path = out / "eval.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get(name)
        when = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (OSError, ValueError, AttributeError):
        rows = None
    if not isinstance(rows, dict) or not rows:
        return f"{EVAL_START}\n{EVAL_END}"
    return eval_section(rows, f"From OUTPUT_DIR/eval.json, written {when} by an eval stage that ran before "
                        "this save: if this stage was retrained since, these numbers are of its earlier weights "
                        "(run the eval stage again to refresh them).")


def _command_line() -> str | None:
    """The run's command line, with the program shown as srppo-fast; None when it was not started as one
    (srppo_fast.runner.run called from Python)."""
    args = sys.argv[1:]
    words = [a for a in args if not a.startswith("-")]
    if not words or words[0] not in ("train", "profile"):
        return None
    return shlex.join(["srppo-fast", *args])


def model_card(ctx, name: str, info: dict) -> str:
    """The README.md of stage `name`'s checkpoint, saved with the marker `info`. Reads no model; the data
    fingerprints are the ones in `info` (taken when the stage started), else computed here."""
    cfg: Config = ctx.cfg
    fp = info.get("fingerprint") or stage_fingerprint(cfg, name)
    stages = lineage(cfg, name)
    step, complete = info.get("step", "?"), bool(info.get("complete"))
    base = cfg.model.base
    front = {"library_name": "transformers", **({"base_model": base} if base != "scratch" else {}),
             "tags": ["srppo-fast", name]}
    state = (f"complete, after step {step}" if complete else
             f"a resumable mid-stage save after step {step} (trainer state included; the reproducing command "
             "below, in the same output_dir, resumes it)")
    if base == "scratch":
        base_line = f"`scratch`: a randomly initialised `{cfg.model.arch.get('model_type', '?')}` (architecture below)"
    else:
        what = "a GGUF file" if is_gguf(base) else "a local directory" if os.path.isdir(base) else "a hub model"
        base_line = f"`{base}` ({what})"
    tokenizer = cfg.model.tokenizer
    world_tok = tokenizer == "world" or (tokenizer == "auto" and base == "scratch")
    tok_line = f"`{tokenizer}`" + (" (trained on the embedded world's corpus)" if world_tok else
                                   " (the base's)" if tokenizer == "auto" else "") + "; saved in this directory"
    lines = ["---", _yaml(front).rstrip(), "---", "",
             f"# {LABELS.get(name, name)} (`{name}`)", "",
             f"A Hugging Face checkpoint written by the `{name}` stage of an srppo-fast run.", "",
             "| | |", "|---|---|",
             f"| stage | `{name}`: {_cell(describe_stage(cfg, name))} |",
             f"| checkpoint | {state} |",
             f"| base model | {_cell(base_line)} |",
             f"| tokenizer | {_cell(tok_line)} |",
             f"| srppo-fast | {_version()} |",
             f"| saved | {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} |"]
    if STAGE_TYPES[name] == "rl" and getattr(cfg, name).advantage.estimator == "gae":
        lines.append("| critic | the value model, in `critic/` |")
    lines += ["", "Load it with `transformers.AutoModelForCausalLM.from_pretrained(\"<this directory>\")` and "
              "`AutoTokenizer.from_pretrained(\"<this directory>\")`.", ""]
    if base == "scratch":
        lines += ["## Base model", "", "`model.base: scratch`; `model.arch`:", "",
                  _block(_yaml(dict(cfg.model.arch)), "yaml"), ""]
    lines += ["## Stages", "", "The stages that made this model, in run order, each with its config section:", ""]
    for i, stage in enumerate(stages, 1):
        this = " (this checkpoint)" if stage == name else ""
        lines += [f"{i}. `{stage}`{this}: {describe_stage(cfg, stage)}; reads {_reads(cfg, stage)}", "",
                  _block(_yaml({stage: to_dict(getattr(cfg, stage))}), "yaml"), ""]
    lines += [*_data_section(cfg, stages, fp.get("data", {})), "", _saved_eval(ctx.out, name), ""]
    upto = cfg.stages[:cfg.stages.index(name) + 1] if name in cfg.stages else stages
    reproduce = shlex.join(["srppo-fast", "train", "--config", "config.yaml", f"stages=[{','.join(upto)}]"])
    original = _command_line()
    lines += ["## Reproduce", "",
              "`config.yaml` is the run's resolved config (OUTPUT_DIR/config.yaml, and below). From the directory the "
              "run was started in (relative paths in it are resolved from there):", "", _block(reproduce, "bash"), "",
              "The stages before this one keep their places in the list, so each gets the same seed. Against the "
              "same output_dir the complete stages are skipped; add `output_dir=NEW_DIR` to train anew.", ""]
    lines += (["The run's own command line:", "", _block(original, "bash"), ""] if original else
              ["The run was started from Python (srppo_fast.runner.run), not from the command line.", ""])
    lines += ["<details>", "<summary>config.yaml (the resolved config)</summary>", "",
              _block(CONFIG_HEADER + _yaml(to_dict(cfg)), "yaml"), "", "</details>", ""]
    return "\n".join(lines)


def _set_manifest_entry(ckpt: Path, size: int | None) -> None:
    """Record README.md at `size` (None: unlisted) in the checkpoint's manifest, so that the copy stays
    complete (io.is_complete) for a later save's recovery. A checkpoint without a manifest is left alone."""
    path = ckpt / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if size is None:
        files.pop(README, None)
    else:
        files[README] = size
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True))


def add_eval_to_cards(ctx, results: dict) -> list[Path]:
    """Write the eval stage's rows into the card of every evaluated model that is a stage with a complete
    checkpoint (rank 0, after eval.json). The weights and the marker are untouched, so the stage still counts as
    complete; the manifest is updated around the rewrite, so the copy is complete at every instant. Returns the
    cards written."""
    from .modeling import checkpoint_info

    written = []
    for ref, rows in results.items():
        ckpt = ctx.checkpoint_dir(ref) if ref in MODEL_STAGES else None
        info = checkpoint_info(ckpt) if ckpt is not None and ckpt.is_dir() else None
        if not info or not info.get("complete"):
            continue
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = eval_section(rows, f"Measured on these weights by this run's eval stage ({when}; greedy answers; "
                                     "the whole table is OUTPUT_DIR/eval.md).")
        card = ckpt / README
        try:
            text = card.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""
        start, end = text.find(EVAL_START), text.find(EVAL_END)
        if start >= 0 and end > start:
            text = text[:start] + section + text[end + len(EVAL_END):]
        elif ref not in ctx.cfg.stages:  # no card, and this run's config need not be the one that made it
            log.info("%s has no model card with an evaluation section; its rows are in eval.md only", ckpt)
            continue
        else:  # a checkpoint saved without a card (an older srppo-fast): a whole new one
            text = model_card(ctx, ref, info)
            start, end = text.find(EVAL_START), text.find(EVAL_END)
            text = text[:start] + section + text[end + len(EVAL_END):]
        data = text.encode("utf-8")
        _set_manifest_entry(ckpt, None)
        atomic_write_text(card, text)
        _set_manifest_entry(ckpt, len(data))
        written.append(card)
    if written:
        log.info("evaluation rows added to %s", ", ".join(str(p) for p in written))
    return written
