"""The SPIN baseline: its DPO loss against a textbook per-pair loop, the zero gradient of a pair that is one
sequence twice, a tiny run whose implicit reward margin rises, kill-and-resume, and its option checks."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from srppo_fast.batching import pack_sequences
from srppo_fast.cli import main
from srppo_fast.config_load import load_config
from srppo_fast.errors import ConfigError
from srppo_fast.metrics import read_metrics
from srppo_fast.modeling import checkpoint_info
from srppo_fast.spin_pairs import build_pairs, dpo_loss, pair_share, sequence_logprobs

from .helpers import QUICKSTART, load_weights, step_rows, tiny_run_overrides, train_command

TINY_SPIN = ["spin.iterations=2", "spin.epochs=2", "spin.batch_size=4", "spin.rollout.max_new_tokens=12",
             "spin.max_prompt_len=32", "spin.max_seq_len=128", "spin.micro_batch_tokens=512", "spin.optim.lr=1e-3",
             "spin.optim.warmup_ratio=0", "spin.beta=0.5", "eval.max_new_tokens=12"]


def test_dpo_loss_and_gradient_match_a_per_pair_loop():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(37, generator=g, dtype=torch.float32) * 5 - 20 for _ in range(4))
    beta = 0.3
    leaves = [t.clone().requires_grad_() for t in (pc, pr)]
    losses, h = dpo_loss(leaves[0], leaves[1], rc, rr, beta)
    losses.mean().backward()
    want_loss, want_grads = [], ([], [])
    for i in range(37):  # the textbook: -log sigma(beta * (log-ratio of chosen - log-ratio of rejected))
        margin = beta * ((float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i])))
        want_loss.append(-math.log(1.0 / (1.0 + math.exp(-margin))))
        d = -beta / (1.0 + math.exp(margin)) / 37  # d loss_mean / d logp_chosen; the rejected gets its negative
        want_grads[0].append(d)
        want_grads[1].append(-d)
    torch.testing.assert_close(losses, torch.tensor(want_loss), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, beta * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(leaves[0].grad, torch.tensor(want_grads[0]), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(leaves[1].grad, torch.tensor(want_grads[1]), rtol=1e-5, atol=1e-8)


class _Demos:  # what build_pairs reads of Demos
    def __init__(self, prompts, chosen):
        self.prompts, self.chosen = prompts, chosen


def test_a_pair_that_is_one_sequence_twice_has_no_gradient(tiny_model, tokenizer):
    """Rejected == chosen: the pair contributes exactly zero gradient (its h is detached), while a real pair in the
    same micro-batch still trains; without the flag the two terms cancel only to rounding."""
    prompt = tokenizer("<|user|>12+7=?", add_special_tokens=False)["input_ids"]
    response = tokenizer(" 19", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    other = tokenizer(" 91", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    seq = np.asarray(prompt + response, dtype=np.int32)
    targets = np.r_[np.zeros(len(prompt), bool), np.ones(len(response), bool)]
    demos = _Demos([prompt, prompt], [(seq, targets), (seq, targets)])
    pairs = build_pairs(demos, [response, other])  # pair 0: identical; pair 1: a real one
    batch = pack_sequences(pairs, np.arange(4))
    ref = torch.zeros(2, 2)

    def grads(identical, pair):
        tiny_model.zero_grad()
        logp = sequence_logprobs(tiny_model, batch).view(-1, 2)
        losses, _ = dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], 0.5, identical)
        losses[pair].backward()
        return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                          for p in tiny_model.parameters()])

    flagged = torch.tensor([True, False])
    assert grads(flagged, 0).abs().max() == 0
    assert grads(flagged, 1).abs().max() > 1e-3
    unflagged = grads(None, 0).abs().max()
    assert unflagged < 1e-5 * grads(None, 1).abs().max()  # the math: cancels; numerically: to rounding


def test_pairs_share_their_micro_batch(tokenizer):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(5, 300, rng.integers(3, 20))) for _ in range(9)]
    chosen = []
    for p in prompts:
        r = list(rng.integers(5, 300, rng.integers(1, 30)))
        chosen.append((np.asarray(p + r, np.int32), np.r_[np.zeros(len(p), bool), np.ones(len(r), bool)]))
    pairs = build_pairs(_Demos(prompts, chosen), [list(rng.integers(5, 300, rng.integers(1, 30))) for _ in prompts])
    seen = []
    for rank in range(2):
        for batch in pair_share(pairs, np.arange(9), 100, rank, 2).real():
            ids = batch.seq_ids
            assert np.array_equal(ids[1::2], ids[0::2] + 1) and (ids[0::2] % 2 == 0).all()
            assert batch.num_tokens <= 100
            seen += list(ids[0::2] // 2)
    assert sorted(seen) == list(range(9))


@pytest.fixture(scope="module")
def sft_done(tmp_path_factory):
    out = tmp_path_factory.mktemp("spin_base")
    assert main(["train", "--config", QUICKSTART, *tiny_run_overrides(out), "stages=[pretrain,sft]"]) == 0
    return out


def test_a_tiny_spin_run_raises_the_margin(sft_done, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(sft_done, out)
    assert main(["train", "--config", QUICKSTART, *tiny_run_overrides(out), *TINY_SPIN,
                 "stages=[pretrain,sft,spin,eval]", "eval.models=[sft,spin]"]) == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "spin"]
    iters = [r for r in rows if "spin/identical_fraction" in r]  # each iteration's first step
    steps = [r for r in rows if "loss" in r]
    assert [r["iteration"] for r in iters] == [1, 2] and len(steps) == 8  # 8 demos, 4 pairs a step, 2 epochs
    for it in (1, 2):
        margins = [r["rewards/margin"] for r in steps if r["iteration"] == it]
        assert abs(margins[0]) < 1e-3  # the policy starts each iteration as its own reference
        assert margins[-1] > margins[0] + 0.05, margins
        assert all(0.0 <= r["rewards/accuracy"] <= 1.0 and r["loss"] > 0 for r in steps)
    assert {"spin/sample_accuracy", "spin/sample_length", "time/generate"} <= set(iters[0])
    assert checkpoint_info(out / "checkpoints" / "spin")["complete"]
    table = (out / "eval.md").read_text()
    assert "| SPIN |" in table and "| SFT |" in table
    from srppo_fast.report import make_report

    assert out / "report" / "spin.png" in make_report(out)


def test_a_killed_spin_run_resumes_to_the_same_result(sft_done, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    runs = {}
    for kind in ("straight", "killed"):
        out = tmp_path / kind
        shutil.copytree(sft_done, out)
        args = train_command(out, [*TINY_SPIN, "spin.save_every=0", "stages=[pretrain,sft,spin]"])
        if kind == "straight":
            done = subprocess.run(args, env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
        else:
            # SIGTERM once step 2 is logged, from inside (tests/faulty.py): a tiny SPIN stage can finish its last
            # step before a watcher outside could send it, and the kill must land inside the loop on any machine
            killer = [sys.executable, "-m", "tests.faulty", *args[args.index("srppo_fast") + 1:]]
            proc = subprocess.Popen(killer, env={**env, "SRPPO_FAST_TEST_SIGTERM_AT": "spin:2"},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            err = proc.communicate(timeout=300)[1]
            assert proc.returncode == 130, err
            info = checkpoint_info(out / "checkpoints" / "spin")
            assert info["complete"] is False and 2 <= info["step"] < 8
            done = subprocess.run(args, env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
            assert f"resuming spin from step {info['step']}" in done.stderr
        runs[kind] = out
    assert step_rows(runs["killed"] / "metrics.jsonl", "spin") == step_rows(runs["straight"] / "metrics.jsonl", "spin")
    a, b = (load_weights(runs[kind] / "checkpoints" / "spin") for kind in ("killed", "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides,needle", [
    (["spin.rollout.n_samples=2"], "pairs each demonstration with one sample"),
    (["spin.rollout.tis_cap=2"], "samples once per iteration"),
    (["spin.micro_batch_tokens=200"], "cannot hold a pair"),
    (["spin.init=nosuchstage"], "spin.init"),
])
def test_contradicting_spin_options_are_refused(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(QUICKSTART, [f"output_dir={tmp_path}", *overrides])
