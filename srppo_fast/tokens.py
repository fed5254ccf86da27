"""Records to tokens: the chat template, rendering a conversation (with the spans of its assistant turns), the
prompt's tokens, and tokenizing records into a TokenizedSet (the packed, flat form every stage trains on)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .data import Kind, Record, read_records
from .errors import DataError

# The TULU-v2 format the paper's SFT data uses; taken when a tokenizer brings no chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_template_of(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template_of(tokenizer), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def prompt_tokens(tokenizer, messages: list[dict], limit: int | None = None) -> list[int]:
    """The token ids a model answers from: the conversation rendered with the generation prompt. With `limit`, a
    text too long for `limit` tokens by its length alone is tokenized only as far as that shows (more than `limit`
    ids come back, and the caller drops it), never whole (max_token_chars)."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    if limit is not None:
        text = text[:limit * max_token_chars(tokenizer) + 1]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_with_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant turns (each ending at its EOS)."""
    text = render(tokenizer, messages)
    spans = []
    eos = tokenizer.eos_token or ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[:i + 1])
        if not text.startswith(upto) or not upto.startswith(before):
            raise DataError("the chat template does not render conversations as growing prefixes, so response "
                            "tokens cannot be located; use a prefix-stable template.")
        end = len(upto)
        cut = upto.rfind(eos, len(before)) if eos else -1
        if cut >= 0:
            end = cut + len(eos)
        spans.append((len(before), end))
    return text, spans


@dataclass
class TokenizedSet:
    """Sequences stored flat. Sequence i is tokens[offsets[i]:offsets[i+1]]; targets[j] says whether
    token j is a training target (predicted from token j-1; never true for a sequence's first token)."""

    tokens: np.ndarray  # int32 [total]
    targets: np.ndarray  # bool [total]
    offsets: np.ndarray  # int64 [n+1]
    dropped: int = 0
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.tokens[s:e], self.targets[s:e]

    @property
    def num_targets(self) -> int:
        return int(self.targets.sum())


def _target_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    starts = np.array([s for s, _ in offsets], dtype=np.int64)
    ends = np.array([e for _, e in offsets], dtype=np.int64)
    mask = np.zeros(len(offsets), dtype=bool)
    for lo, hi in spans:  # a token is a target when it overlaps an assistant span
        mask |= (ends > lo) & (starts < hi)
    return mask


def max_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` can stand for (its longest vocabulary entry: a byte-level
    entry has one character per byte, at least as many as the text characters it decodes to). A text of more than
    n x this many characters is longer than n tokens for certain, which is known without tokenizing it."""
    cached = getattr(tokenizer, "_srppo_max_token_chars", None)
    if cached is None:
        cached = max((len(t) for t in tokenizer.get_vocab()), default=1)
        try:
            tokenizer._srppo_max_token_chars = cached
        except AttributeError:  # pragma: no cover - a tokenizer that takes no attributes: computed each time
            pass
    return cached


def tokenize_records(records: list[Record], tokenizer, *, loss_on: Literal["all", "response"], max_seq_len: int,
                     overlong: Literal["drop", "truncate", "error"] = "drop") -> TokenizedSet:
    """Render and tokenize records for language modelling (pretraining or SFT). A text too long by its length alone
    (more characters than max_seq_len tokens can hold) is never tokenized whole: dropped, refused, or its first
    characters tokenized for a truncation (a 5 MB line cost 16 s and 2.2 GB to tokenize, then to drop)."""
    bound = max_seq_len * max_token_chars(tokenizer) + 1
    texts, spans, too_long = [], [], set()
    for rec in records:
        if rec.text is not None:
            bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
            texts.append(bos + rec.text + eos)
            spans.append([(len(bos), len(texts[-1]))])
        elif loss_on == "all":
            texts.append(render(tokenizer, rec.messages))
            spans.append([])
        else:
            text, sp = render_with_spans(tokenizer, rec.messages)
            texts.append(text)
            spans.append(sp)
        if len(texts[-1]) > bound:
            too_long.add(len(texts) - 1)
            if overlong == "error":
                raise DataError(f"{rec.where}: {len(texts[-1]):,} characters, more than "
                                f"max_seq_len={max_seq_len} tokens "
                                "can hold; raise max_seq_len or set overlong=drop or truncate.")
            texts[-1] = "" if overlong == "drop" else texts[-1][:bound]  # truncate: its first tokens are these
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    all_tokens, all_targets, lengths = [], [], []
    dropped = truncated = 0
    for i, (rec, ids, offs, sp) in enumerate(zip(records, enc["input_ids"], enc["offset_mapping"], spans)):
        if i in too_long and overlong == "drop":
            dropped += 1
            continue
        targets = np.ones(len(ids), dtype=bool) if loss_on == "all" else _target_mask(offs, sp)
        if len(targets):
            targets[0] = False
        if len(ids) > max_seq_len:
            if overlong == "error":
                raise DataError(f"{rec.where}: {len(ids)} tokens, more than max_seq_len={max_seq_len}; raise "
                                "max_seq_len or set overlong=drop or truncate.")
            if overlong == "drop":
                dropped += 1
                continue
            ids, targets = ids[:max_seq_len], targets[:max_seq_len]
            truncated += 1
        if not targets.any():
            dropped += 1  # nothing to learn from (e.g. the response was truncated away)
            continue
        all_tokens.append(np.asarray(ids, dtype=np.int32))
        all_targets.append(targets)
        lengths.append(len(ids))
    if not lengths:
        raise DataError(f"no usable examples in {records[0].where.rsplit(':', 1)[0]} (all dropped as longer "
                        f"than max_seq_len={max_seq_len} or without targets).")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedSet(np.concatenate(all_tokens), np.concatenate(all_targets), offsets, dropped, truncated)


def load_lm_data(spec: str, tokenizer, *, kind: Kind, loss_on: Literal["all", "response"], max_seq_len: int,
                 overlong: Literal["drop", "truncate", "error"] = "drop",
                 world_dir: str | None = None) -> TokenizedSet:
    return tokenize_records(read_records(spec, kind, world_dir), tokenizer, loss_on=loss_on,
                            max_seq_len=max_seq_len, overlong=overlong)
