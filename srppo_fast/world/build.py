"""Generate the embedded world into a directory: JSONL splits and a locally trained tokenizer.

Splits (all disjoint in their problems, except that the corpus may contain demonstration and
RL-prompt problems, as a web corpus would):

    corpus         pretraining worksheets ({"messages"}: 1-3 problems, one persona per worksheet)
    demos          careful solutions of in-domain (addition) problems ({"prompt","response"})
    demos_heldout  more of the same, for the SFT loss on held-out demonstrations
    prompts        extra prompts without responses, addition and subtraction (the RL prompt set)
    eval_id        held-out addition prompts, answers and careful solutions (in-domain evaluation)
    eval_ood       held-out subtraction prompts, answers, careful solutions (out-of-domain: no demonstration)
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..config import WORLD_SPLITS, WorldConfig, to_dict
from ..errors import ConfigError
from ..io import atomic_dir, write_jsonl
from . import tasks

WORLD_VERSION = 2
EVAL_HOLDOUT = {"eval_id": "add", "eval_ood": "sub"}

# The world's chat format. The corpus is rendered with it too, so the pretrained model has seen it.
WORLD_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}A: {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
)
SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


def check_world_config(cfg: WorldConfig) -> None:
    """The held-out splits must leave half of each problem family to the corpus and the RL prompts."""
    n_add, n_sub = len(tasks.all_problems("add")), len(tasks.all_problems("sub"))
    if cfg.num_eval + cfg.num_demos_heldout + cfg.num_demos > n_add // 2:
        raise ConfigError(f"world.num_eval + world.num_demos_heldout + world.num_demos ({cfg.num_eval} + "
                          f"{cfg.num_demos_heldout} + {cfg.num_demos}) is more than half of the {n_add} addition "
                          f"problems ({n_add // 2}); lower them.")
    if cfg.num_eval > n_sub // 2:
        raise ConfigError(f"world.num_eval ({cfg.num_eval}) is more than half of the {n_sub} subtraction problems "
                          f"({n_sub // 2}); lower it.")


def _split_problems(cfg: WorldConfig, rng: random.Random) -> dict[str, list[tasks.Problem]]:
    check_world_config(cfg)
    add = tasks.all_problems("add")
    sub = tasks.all_problems("sub")
    rng.shuffle(add)
    rng.shuffle(sub)
    n_eval, n_held, n_demo = cfg.num_eval, cfg.num_demos_heldout, cfg.num_demos
    splits = {
        "eval_id": add[:n_eval],
        "demos_heldout": add[n_eval:n_eval + n_held],
        "demos": add[n_eval + n_held:n_eval + n_held + n_demo],
        "eval_ood": sub[:n_eval],
    }
    pool_add = add[n_eval + n_held + n_demo:]
    pool_sub = sub[n_eval:]
    splits["prompts"] = [rng.choice(pool_add if i % 2 == 0 else pool_sub) for i in range(cfg.num_prompts)]
    # the corpus never shows an evaluation problem or a held-out demonstration
    splits["_corpus_add"] = add[n_eval + n_held:]
    splits["_corpus_sub"] = pool_sub
    return splits


def _worksheet(cfg: WorldConfig, rng: random.Random, pools: dict[str, list[tasks.Problem]]) -> dict:
    careful = rng.random() < cfg.careful_fraction
    messages = []
    for _ in range(rng.randint(1, 3)):
        p = rng.choice(pools[rng.choice(tasks.FAMILIES)])
        answer = tasks.careful_solution(p) if careful else tasks.hasty_solution(p, rng, cfg.hasty_accuracy)
        messages += [{"role": "user", "content": p.question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "persona": "careful" if careful else "hasty"}


def generate_records(cfg: WorldConfig) -> dict[str, list[dict]]:
    """All splits as lists of JSON records (deterministic in cfg.seed)."""
    rng = random.Random(cfg.seed)
    problems = _split_problems(cfg, rng)
    pools = {"add": problems["_corpus_add"], "sub": problems["_corpus_sub"]}
    records: dict[str, list[dict]] = {
        "corpus": [_worksheet(cfg, rng, pools) for _ in range(cfg.num_corpus_docs)],
        "prompts": [{"prompt": p.question, "task": p.family} for p in problems["prompts"]],
    }
    for split in ("demos", "demos_heldout"):
        records[split] = [{"prompt": p.question, "response": tasks.careful_solution(p), "task": p.family}
                          for p in problems[split]]
    for split in EVAL_HOLDOUT:  # the careful solution is the reference for the log-likelihood
        records[split] = [{"prompt": p.question, "response": tasks.careful_solution(p), "task": p.family,
                           "answer": p.result} for p in problems[split]]
    assert set(records) == set(WORLD_SPLITS)
    return records


def _render_plain(messages: list[dict]) -> str:
    """The chat format without special tokens: the tokenizer's training text."""
    out = []
    for m in messages:
        out.append(f"Q: {m['content']}\n" if m["role"] == "user" else f"A: {m['content']}\n")
    return "".join(out)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path) -> None:
    """Byte-level BPE with one token per digit (arithmetic stays learnable), saved for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Whitespace and punctuation are tokens of their own, so a prompt ending in "A: " tokenizes the
    # same alone as inside prompt+response (no merged " answer" token at the boundary).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = WORLD_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def _manifest(cfg: WorldConfig) -> dict:
    return {"version": WORLD_VERSION, "config": to_dict(cfg)}


def build_world(cfg: WorldConfig, world_dir: str | Path) -> Path:
    """Write the world into `world_dir` (reused when it already holds the same world)."""
    world_dir = Path(world_dir)
    manifest_path = world_dir / "world.json"
    if world_dir.exists() and not world_dir.is_dir():
        raise ConfigError(f"{world_dir} is a file; the world is written to a directory: give another path.")
    parent = world_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"'{world_dir}': '{parent}' is a file, so no directory can be made under it; give another "
                          "path.")
    if world_dir.is_dir() and any(world_dir.iterdir()) and not manifest_path.is_file():
        raise ConfigError(f"{world_dir} is not empty and holds no world srppo-fast wrote (no world.json); writing "
                          "the world there would delete its contents: give an empty or new directory.")
    if manifest_path.is_file():
        try:
            with open(manifest_path, encoding="utf-8") as fh:
                if json.load(fh).get("build") == _manifest(cfg):
                    return world_dir
        except (ValueError, AttributeError):
            pass  # a damaged manifest: rebuild
    records = generate_records(cfg)
    with atomic_dir(world_dir) as tmp:
        for split, rows in records.items():
            write_jsonl(os.path.join(tmp, f"{split}.jsonl"), rows)
        train_tokenizer([_render_plain(r["messages"]) for r in records["corpus"]], cfg.vocab_size,
                        os.path.join(tmp, "tokenizer"))
        counts = {split: len(rows) for split, rows in records.items()}
        careful = sum(r["persona"] == "careful" for r in records["corpus"])
        with open(os.path.join(tmp, "world.json"), "w", encoding="utf-8") as fh:
            json.dump({"build": _manifest(cfg), "counts": counts, "careful_corpus_docs": careful}, fh, indent=1)
    return world_dir
