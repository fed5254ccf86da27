"""What an RL step shows of its samples: the samples table, rollout statistics, verifier results, and
evaluation during training."""

from __future__ import annotations

import logging

import torch

from ..evaluation import greedy_metrics, load_eval_set
from ..experience import (
    Experience,
)

log = logging.getLogger("srppo_fast")


def samples_table(exp: Experience, tokenizer, questions: list[str], verifier, k: int, rng) -> list[dict]:
    """`k` responses of the buffer for reading: a quarter (at least one) of the highest rewards and as many of the
    lowest, alternating, then random others; each with its prompt, reward, per-token log-ratio summary (sum,
    largest token, its position), KL to the reference and the verifier's verdict (None without one)."""
    reward, log_ratio, kl = exp.stats["reward"], exp.stats["log_ratio"], exp.stats["kl"]
    order = torch.argsort(reward, descending=True, stable=True).tolist()
    extremes = max(1, k // 4)  # a quarter of the rows at each end (k=8: 2 highest, 2 lowest, 4 random)
    picks: dict[int, str] = {}
    for high, low in list(zip(order, reversed(order)))[:extremes]:
        for i, label in ((high, "highest"), (low, "lowest")):
            if len(picks) < k and i not in picks:
                picks[i] = label
    rest = [i for i in order if i not in picks]
    for i in rng.permutation(rest)[:max(0, k - len(picks))].tolist():
        picks[i] = "random"
    offsets, rows = exp.sequences.offsets, []
    for i, pick in picks.items():
        seq = exp.sequences.tokens[offsets[i]:offsets[i + 1]].tolist()
        n = int(exp.mask[i].sum())
        response, prompt = seq[len(seq) - n:], seq[:len(seq) - n]
        text = tokenizer.decode(response, skip_special_tokens=True)
        row = {"pick": pick, "prompt": tokenizer.decode(prompt, skip_special_tokens=False), "response": text,
               "reward": float(reward[i]), "log_ratio_sum": None, "log_ratio_max": None,
               "log_ratio_max_token": None, "log_ratio_max_pos": None, "kl": float(kl[i]),
               "correct": verifier([questions[i]], [text])["accuracy"] == 1.0 if verifier else None, "length": n,
               "ended": bool(exp.ended[i])}
        if log_ratio is not None and n:
            per_token = log_ratio[i][exp.mask[i]]
            top = int(per_token.argmax())
            row.update(log_ratio_sum=float(per_token.sum()), log_ratio_max=float(per_token[top]),
                       log_ratio_max_token=tokenizer.decode([response[top]]), log_ratio_max_pos=top)
        rows.append(row)
    return rows


def rollout_stats(exp: Experience, gens, tokenizer, questions: list[str], verifier) -> dict:
    lengths = exp.lengths.float()
    stats = {"response_length": float(lengths.mean()), "eos_rate": float(exp.ended.float().mean())}
    stats.update(verify_samples(verifier, tokenizer, questions, gens.responses, "sample/"))
    return stats


def verify_samples(verifier, tokenizer, questions: list[str], responses: list[list[int]], prefix: str) -> dict:
    """The verifier's metrics (accuracy, careful share) of sampled responses, keys prefixed; {} without one."""
    if verifier is None:
        return {}
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    return {f"{prefix}{k}": v for k, v in verifier(questions, texts).items()}


def evaluate_during_training(ctx, name: str, step: int, model, tokenizer) -> None:
    record = {"stage": name, "step": step}
    for spec in ("world:eval_id", "world:eval_ood"):
        evalset = load_eval_set(spec, tokenizer, ctx.world_dir)
        row = greedy_metrics(model, tokenizer, evalset, ctx.cfg.eval.max_new_tokens, ctx.cfg.eval.batch_size)
        record.update({f"eval/{evalset.name}/{k}": v for k, v in row.items()})
    ctx.metrics.log(record)
