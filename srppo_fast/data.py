"""Data: read JSONL / local Hugging Face datasets / world splits, render chats, tokenize into flat arrays.

Record forms (one JSON object per line):

    {"text": "..."}                                   raw text (pretraining: loss on every token)
    {"prompt": "...", "response": "..."}              one exchange (optional "system")
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}   chat (TULU-v2 style)
    {"prompt": "..."} or {"messages": [..., user]}    prompt-only, for the RL stage

Other keys are kept as metadata (the world's "task" and "answer", say). Chats are rendered with the
tokenizer's chat template, or DEFAULT_CHAT_TEMPLATE when it has none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from .errors import DataError

ROLES = ("system", "user", "assistant")
Kind = Literal["lm", "sft", "prompt"]


@dataclass
class Record:
    """One normalised example: either raw `text`, or `messages` (a chat), plus metadata."""

    where: str  # "file:line" for error messages
    text: str | None = None
    messages: list[dict] | None = None
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# reading


def resolve_spec(spec: str, world_dir: str | None) -> str:
    """A data spec ('world:<split>', 'hf:NAME[:SPLIT]' or a path) -> a path on disk (hf: stays as is)."""
    if spec.startswith("world:"):
        if world_dir is None:
            raise DataError(f"'{spec}' names an embedded world split, but this run has no world directory.")
        return os.path.join(world_dir, spec.split(":", 1)[1] + ".jsonl")
    return spec


def _binary_kind(head: bytes) -> str | None:
    """What a file that is not UTF-8 JSON Lines text looks like from its first bytes, or None."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 text; save it as UTF-8"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed; decompress it (gunzip)"
    if head.startswith(b"PAR1"):
        return "a Parquet file; put it in a directory of its own and give that directory"
    if b"\0" in head:
        return "a binary file (NUL bytes); give JSON Lines text, one JSON object per line"
    return None


def _iter_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """Lines are read as bytes and decoded one by one, so a non-UTF-8 byte is reported at its line."""
    def unreadable(e: OSError) -> DataError:
        return DataError(f"cannot read the data file '{path}': {e.strerror or e}; check that this user may read "
                         "it.")

    try:
        fh = open(path, "rb")
    except OSError as e:
        raise unreadable(e) from None
    with fh:
        try:
            kind = _binary_kind(fh.read(8192))
            fh.seek(0)
        except OSError as e:
            raise unreadable(e) from None
        if kind is not None:
            raise DataError(f"'{path}' is not JSON Lines text: it is {kind}.")
        lineno = 0
        while True:
            try:
                raw = fh.readline()
            except OSError as e:
                raise unreadable(e) from None
            if not raw:
                return
            lineno += 1
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                                "JSON object.") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
            yield where, obj


# Files that make a directory a model or tokenizer checkpoint, never a data set.
_CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json")


def _files_under(path: str) -> list[str]:
    """Paths (relative to `path`) of the non-hidden files below a directory, sorted."""
    found = []

    def fail(e: OSError) -> None:
        raise DataError(f"cannot read the data directory '{e.filename or path}': {e.strerror or e}; check that "
                        "this user may list and read it.")

    for root, dirs, files in os.walk(path, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.relpath(os.path.join(root, f), path) for f in files if not f.startswith(".")]
    return sorted(found)


def _listing(files: list[str], limit: int = 4) -> str:
    return ", ".join(files[:limit]) + (f" and {len(files) - limit} more" if len(files) > limit else "")


@contextlib.contextmanager
def _quiet(datasets):
    """Silence the progress bars and log lines of `datasets` and `huggingface_hub` (a README without a card
    block, a file that failed to parse): their errors reach the user as one DataError instead."""
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]
    levels, bars = [lg.level for lg in loggers], datasets.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _dataset_dir_error(path: str, files: list[str], e: Exception) -> DataError:
    """One DataError for whatever `datasets` raised on a local directory: no readable files, a bad line in one
    of its .jsonl files (found by reading them here, with file:line), or the library's own reason."""
    if type(e).__name__ in ("EmptyDatasetError", "DataFilesNotFoundError"):
        return DataError(f"the data directory '{path}' holds no data files the `datasets` library reads (found "
                         f"{_listing(files)}); put .jsonl/.json/.csv/.parquet files in it, or point the data key "
                         "at a .jsonl file.")
    for name in files:
        if name.endswith(".jsonl"):
            try:
                for _ in _iter_jsonl(os.path.join(path, name)):
                    pass
            except DataError as bad:
                return bad
    reason, cause = " ".join(str(e).split()) or type(e).__name__, e
    while cause.__cause__ or cause.__context__:  # the library wraps the reason (a parse error, a cast)
        cause = cause.__cause__ or cause.__context__
    if cause is not e and str(cause).strip():
        reason += f": {' '.join(str(cause).split())}"
    reason = reason if len(reason) <= 300 else reason[:297] + "..."
    return DataError(f"could not read the data directory '{path}' ({type(e).__name__}: {reason}); fix its files, or "
                     "convert the data to one .jsonl file.")


def _iter_hf_dataset(path: str) -> Iterator[tuple[str, dict]]:
    files = _files_under(path)
    if not files:
        raise DataError(f"the data directory '{path}' is empty; put .jsonl files (or a dataset saved with "
                        "Dataset.save_to_disk) in it, or point the data key at a .jsonl file.")
    checkpoint = [f for f in files if f in _CHECKPOINT_FILES or (f.endswith(".safetensors") and os.sep not in f)]
    if checkpoint:
        top = [f for f in files if os.sep not in f]
        raise DataError(f"'{path}' is a model or tokenizer directory (it holds {_listing(top)}), not data; "
                        "give a .jsonl file or a dataset directory as data, and model directories to model.base "
                        "or init.")
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the dataset directory '{path}' needs the `datasets` package: "
                        "pip install 'srppo-fast[datasets]'.") from None
    saved = os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(os.path.join(path, "state.json"))
    try:
        with _quiet(datasets):
            ds = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
    except Exception as e:  # noqa: BLE001 - the library raises many kinds for a local directory; one line each
        raise _dataset_dir_error(path, files, e) from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    for i, row in enumerate(ds):  # a column missing from a row reads as None: treat it as absent
        yield f"{path}[{i}]", {k: v for k, v in row.items() if v is not None}


def _iter_hub_dataset(spec: str) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading '{spec}' needs the `datasets` package: pip install 'srppo-fast[datasets]'.") from None
    name, _, split = spec[3:].partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; the user needs the first line
        raise DataError(f"could not load the hub dataset '{name}' (split {split or 'train'}): "
                        f"{str(e).splitlines()[0]}; check the name and split, or download it to a directory.") from None
    for i, row in enumerate(ds):
        yield f"{spec}[{i}]", {k: v for k, v in row.items() if v is not None}


def iter_raw(path: str) -> Iterator[tuple[str, dict]]:
    """(where, object) pairs from a JSONL file, a local Hugging Face dataset directory, or hf:NAME[:SPLIT]."""
    if path.startswith("hf:"):
        yield from _iter_hub_dataset(path)
    elif os.path.isdir(path):
        yield from _iter_hf_dataset(path)
    elif os.path.isfile(path):
        yield from _iter_jsonl(path)
    elif os.path.lexists(path):
        raise DataError(f"data path '{path}' is neither a file nor a directory (a broken link, a pipe?); give a "
                        ".jsonl file or a dataset directory.")
    else:
        raise DataError(f"data file '{path}' does not exist; fix the path in the config.")


def _check_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{'role': one of {'/'.join(ROLES)}, "
                            f"'content': a string}}, got {reprlib.repr(m)}.")
        check_text(m["content"], where, f"messages[{i}].content")
    first = next(m["role"] for m in messages if m["role"] != "system") if any(
        m["role"] != "system" for m in messages) else "system"
    if first != "user":
        raise DataError(f"{where}: a conversation must start with a user turn (after an optional system turn).")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_text(text: str, where: str, what: str) -> str:
    """`text` if it is valid Unicode (encodable as UTF-8), else one DataError naming the line: JSON can escape a
    lone UTF-16 surrogate (\\ud800), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: {what} is not valid Unicode text (a lone UTF-16 surrogate "
                        f"U+{ord(text[e.start]):04X} "
                        f"at character {e.start + 1}, escaped in the JSON as \\u{ord(text[e.start]):04x}); fix or "
                        "remove that record.") from None
    return text


def normalise(obj: dict, where: str, kind: Kind) -> Record:
    """Turn one raw object into a Record for `kind`, or raise DataError naming the line."""
    def need_str(key: str) -> str:
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(obj[key]).__name__}.")
        return check_text(obj[key], where, f"'{key}'")

    meta = {k: v for k, v in obj.items() if k not in ("text", "prompt", "response", "messages", "system")}
    if "messages" in obj:
        messages = _check_messages(obj["messages"], where)
    elif "prompt" in obj:
        messages = [{"role": "system", "content": need_str("system")}] if "system" in obj else []
        messages.append({"role": "user", "content": need_str("prompt")})
        if "response" in obj:
            messages.append({"role": "assistant", "content": need_str("response")})
    elif "text" in obj:
        if kind != "lm":
            raise DataError(f"{where}: a 'text' record has no prompt; {kind} data needs 'prompt'/'response' "
                            "or 'messages'.")
        return Record(where, text=need_str("text"), meta=meta)
    else:
        raise DataError(f"{where}: expected 'prompt' and 'response', 'messages', or 'text' (pretraining); "
                        f"found keys {sorted(obj)}.")

    if kind == "sft" and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no response to learn from; SFT records need 'response' or an assistant "
                        "message.")
    if kind == "prompt":
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a demonstration used as a prompt: keep what precedes the answer
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{where}: a prompt must end with a user turn.")
    return Record(where, messages=messages, meta=meta)


def read_records(spec: str, kind: Kind, world_dir: str | None = None) -> list[Record]:
    path = resolve_spec(spec, world_dir)
    records = [normalise(obj, where, kind) for where, obj in iter_raw(path)]
    if not records:
        raise DataError(f"'{path}' holds no records; give one JSON object per line.")
    return records


# ---------------------------------------------------------------------------------------------
# chat rendering


# ---------------------------------------------------------------------------------------------
# tokenization


