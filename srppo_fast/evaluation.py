"""Evaluating a model (the eval stage's measurements, stages/eval.py): per model and set: verifier accuracy of
greedy answers (when the set has a verifier: the embedded world's), the share of careful answers (world), EOS rate
and mean answer length, and the mean log-likelihood per token of the reference responses (when the records carry one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .batching import microbatches
from .config import EvalConfig, stage_label
from .data import read_records
from .experience import packed_label_logprobs
from .generation import generate
from .tokens import prompt_tokens, tokenize_records

log = logging.getLogger("srppo_fast")


@dataclass
class EvalSet:
    name: str
    prompts: list[list[int]]  # tokenized with the generation prompt
    questions: list[str]  # the last user message: what a verifier reads
    references: object | None  # TokenizedSet of prompt + reference response, or None
    verifier: object | None  # (questions, responses) -> dict of metrics


def load_eval_set(spec: str, tokenizer, world_dir: str | None) -> EvalSet:
    records = read_records(spec, "prompt", world_dir)
    prompts = [prompt_tokens(tokenizer, r.messages) for r in records]
    questions = [r.messages[-1]["content"] for r in records]
    with_ref = read_records(spec, "lm", world_dir)
    references = None
    if all(r.messages and r.messages[-1]["role"] == "assistant" for r in with_ref):
        references = tokenize_records(with_ref, tokenizer, loss_on="response", max_seq_len=10**9)
    from .world import verifier_for

    return EvalSet(spec.removeprefix("world:"), prompts, questions, references, verifier_for(spec))


def greedy_metrics(model, tokenizer, evalset: EvalSet, max_new_tokens: int, batch_size: int) -> dict:
    gens = generate(model, tokenizer, evalset.prompts, max_new_tokens=max_new_tokens, do_sample=False,
                    batch_size=batch_size)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in gens.responses]
    out = {"eos_rate": float(np.mean(gens.ended)), "length": float(np.mean([len(r) for r in gens.responses]))}
    if evalset.verifier is not None:
        out.update(evalset.verifier(evalset.questions, texts))
    return out


@torch.no_grad()
def reference_loglik(model, references, budget: int, device: torch.device) -> float:
    """Mean log-likelihood per token of the reference responses."""
    model.eval()
    total, count = 0.0, 0
    for batch in microbatches(references, np.arange(len(references)), budget):
        batch = batch.to(device)
        total += float(packed_label_logprobs(model, batch).sum())
        count += batch.num_targets
    return total / max(count, 1)


def evaluate_model(model, tokenizer, sets: list[EvalSet], ev: EvalConfig, device: torch.device) -> dict:
    results = {}
    for s in sets:
        row = greedy_metrics(model, tokenizer, s, ev.max_new_tokens, ev.batch_size)
        if s.references is not None:
            row["loglik"] = reference_loglik(model, s.references, ev.micro_batch_tokens, device)
        results[s.name] = row
    return results


def _cell(value, fmt: str) -> str:
    """A statistic for the table: n/a where it is not defined for the model and set (absent, None or NaN)."""
    return "n/a" if value is None or value != value else format(value, fmt)


def markdown_table(results: dict, labels: dict | None = None) -> str:
    """Models as rows (named by `labels`, default: the stage types' labels); per set: accuracy (and careful share)
    and the reference log-likelihood."""
    sets = list(next(iter(results.values())).keys()) if results else []
    head = ["model"] + [f"{s} accuracy" for s in sets] + [f"{s} loglik/token" for s in sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, rows in results.items():
        cells = [(labels or {}).get(model) or stage_label(model)]
        for s in sets:
            acc = _cell(rows[s].get("accuracy"), ".3f")
            cells.append(f"{acc} (careful {_cell(rows[s]['careful_rate'], '.2f')})" if "careful_rate" in rows[s]
                         else acc)
        cells += [_cell(rows[s].get("loglik"), ".4f") for s in sets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
