"""Does the sequence coherent reward tell right answers from wrong ones? A check of a finished run's π_SFT
against its π_PT on a world split, before spending RL compute on it.

    python benchmarks/reward_separation.py --run runs/smollm2_135m [--split eval_id] [--prompts 48]
        [--samples 4] [--seed 0] [--csv benchmarks/results/reward_separation.csv]

Samples `--samples` responses per prompt from the run's SFT checkpoint (temperature 1, the run's
eval.max_new_tokens), for the first `--prompts` prompts of the world split, rendered with the run's chat
template. Each gets the reward of srppo.reward at sequence granularity: the sum over its tokens of
clip(log π_SFT − log π_PT, ±srppo.reward.token_clip) times srppo.reward.scale (scored as the trainer
scores a rollout buffer: packed log-probs, ops.rewards.coherent_rewards_ref), with
π_PT = srppo.reward.pretrained of the run's config. The world's verifier splits them into right and wrong.
CSV (rewritten whole): one row per group (right, wrong) with n, the reward's mean and standard deviation,
mean length, mean reward per token and the share of tokens at the clip; then a row `auc`: P(reward of a
right answer > reward of a wrong one), ties counting half (0.5 = no separation). Also printed. fp32 on the
CPU (or the GPU when there is one).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.common import cpu_model, git_sha


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished run's output_dir (its checkpoints/sft is read)")
    ap.add_argument("--split", default="eval_id")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)

    from srppo_fast.config_load import load_config
    from srppo_fast.experience import build_sequences, packed_label_logprobs, response_mask, score_tokens
    from srppo_fast.modeling import load_model, load_tokenizer
    from srppo_fast.ops.rewards import coherent_rewards_ref
    from srppo_fast.tokens import render
    from srppo_fast.world import verify

    run = Path(args.run)
    cfg = load_config(str(run / "config.yaml"), [f"output_dir={run}"])
    reward = cfg.srppo.reward
    pt_ref = cfg.model.base if reward.pretrained == "base" else reward.pretrained
    pt_ref = str(run / "checkpoints" / pt_ref) if (run / "checkpoints" / pt_ref).is_dir() else pt_ref
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(str(run / "checkpoints" / "sft"))
    sft = load_model(str(run / "checkpoints" / "sft"), cfg.model).to(device).eval()
    pt = load_model(pt_ref, cfg.model).to(device).eval()
    prompts = [json.loads(line)["prompt"] for line in (run / "world" / f"{args.split}.jsonl").open()][:args.prompts]
    torch.manual_seed(args.seed)
    prompt_ids, responses, right = [], [], []
    for p in prompts:
        ids = tok(render(tok, [{"role": "user", "content": p}], add_generation_prompt=True),
                  add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            out = sft.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=cfg.eval.max_new_tokens, num_return_sequences=args.samples,
                               pad_token_id=tok.pad_token_id)
        for seq in out:
            resp = seq[ids.shape[1]:].tolist()
            if tok.eos_token_id in resp:
                resp = resp[:resp.index(tok.eos_token_id) + 1]
            prompt_ids.append(ids[0].tolist())
            responses.append(resp)
            right.append(verify(p, tok.decode(resp, skip_special_tokens=True)))
    # scored as the trainer scores a rollout buffer: packed log-probs, then the coherent reward op
    seqs, mask = build_sequences(prompt_ids, responses), response_mask(responses)
    sft_lp, pt_lp = (score_tokens(lambda b, m=m: packed_label_logprobs(m, b), seqs, mask, 4096, device,
                                  contextlib.nullcontext) for m in (sft, pt))
    _, raw, d = coherent_rewards_ref(sft_lp, pt_lp, mask, scale=reward.scale, token_clip=reward.token_clip,
                                     length_normalize=reward.length_normalize)
    at_clip = ((d.abs() >= reward.token_clip) & mask).sum(-1) / mask.sum(-1) if reward.token_clip else 0 * raw
    rows = [{"right": ok, "len": len(r), "reward": float(v), "clipped": float(c)}
            for ok, r, v, c in zip(right, responses, raw, at_clip)]
    table = []
    for name, right in (("right", True), ("wrong", False)):
        g = [r for r in rows if r["right"] == right]
        if g:
            table.append({"group": name, "n": len(g), "reward_mean": statistics.mean(r["reward"] for r in g),
                          "reward_sd": statistics.pstdev(r["reward"] for r in g),
                          "length": statistics.mean(r["len"] for r in g),
                          "reward_per_token": statistics.mean(r["reward"] / max(1, r["len"]) for r in g),
                          "clipped_share": statistics.mean(r["clipped"] for r in g)})
    good, bad = [r["reward"] for r in rows if r["right"]], [r["reward"] for r in rows if not r["right"]]
    auc = (sum((a > b) + 0.5 * (a == b) for a in good for b in bad) / (len(good) * len(bad))
           if good and bad else float("nan"))
    table.append({"group": "auc", "n": len(rows), "reward_mean": auc})
    meta = {"run": str(run), "split": args.split, "pt": pt_ref, "token_clip": reward.token_clip,
            "machine": torch.cuda.get_device_name() if device.type == "cuda" else cpu_model(), "git_sha": git_sha()}
    for row in table:
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.csv:
        fields = ["group", "n", "reward_mean", "reward_sd", "length", "reward_per_token", "clipped_share", *meta]
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            for row in table:
                w.writerow({**row, **meta})
    return 0


if __name__ == "__main__":
    sys.exit(main())
