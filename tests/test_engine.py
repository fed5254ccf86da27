"""Update engine: schedule shape, decay groups, accumulation over micro-batches = one big batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from srppo_fast.config import OptimConfig
from srppo_fast.data import load_lm_data
from srppo_fast.engine import TorchEngine, lr_lambda, param_groups
from srppo_fast.stages.lm import EpochSampler, lm_train_step

from .conftest import make_model


def test_warmup_then_cosine_to_floor():
    f = lr_lambda(OptimConfig(schedule="cosine", warmup_ratio=0.1, min_lr_ratio=0.1), total_steps=100)
    values = [f(s) for s in range(100)]
    assert values[0] == pytest.approx(1 / 11) and values[9] == pytest.approx(10 / 11)
    assert values[10] == pytest.approx(1.0)
    assert values[99] == pytest.approx(0.1)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    linear = lr_lambda(OptimConfig(schedule="linear", warmup_ratio=0.0, min_lr_ratio=0.0), total_steps=11)
    assert [round(linear(s), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_lambda(OptimConfig(schedule="constant", warmup_ratio=0.0), 10)(9) == 1.0


def test_no_weight_decay_on_norms(tiny_model):
    decay, no_decay = param_groups(tiny_model, 0.1)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) > 0


@pytest.mark.parametrize("budget", [64, 100000])
def test_micro_batch_split_does_not_change_the_gradient(world_dir, tokenizer, budget):
    """A step over 8 sequences accumulates the same gradient whether they are packed in one micro-batch
    or many (the loss is normalised by the step's target count, not per micro-batch)."""
    data = load_lm_data("world:demos", tokenizer, kind="sft", loss_on="response", max_seq_len=128,
                        world_dir=world_dir)
    results = []
    for b in (budget, 10**6):
        torch.manual_seed(0)
        engine = TorchEngine(make_model(tokenizer), OptimConfig(lr=1e-2, warmup_ratio=0.0, grad_clip=0.0), 4,
                             torch.device("cpu"))
        grads = []
        step = engine.optimizer.step

        def capture(*args, **kwargs):
            grads.extend(p.grad.clone() for p in engine.model.parameters())
            return step(*args, **kwargs)

        engine.optimizer.step = capture
        results.append((lm_train_step(engine, data, np.arange(8), b), grads))
    (s1, g1), (s2, g2) = results
    if budget == 64:
        assert s1["microbatches"] > 1 and s2["microbatches"] == 1
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5)
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


def test_sampler_epochs_and_resume_position():
    s = EpochSampler(10, seed=3)
    first = np.concatenate([s.take(4) for _ in range(5)])  # 20 = two epochs, batches straddle
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert not np.array_equal(first[:10], first[10:])  # a new permutation per epoch
    resumed = EpochSampler(10, seed=3, position=8)
    assert np.array_equal(resumed.take(12), first[8:20])
    assert np.array_equal(EpochSampler(5, 0, shuffle=False).take(7), [0, 1, 2, 3, 4, 0, 1])


def _packed_grads(model, batch, engine_kwargs) -> tuple[float, list[torch.Tensor]]:
    from srppo_fast.stages.lm import packed_token_logprobs

    engine = TorchEngine(model, OptimConfig(), 1, torch.device("cpu"), **engine_kwargs)
    with engine.autocast():
        loss = -packed_token_logprobs(engine.model, batch).sum() / batch.num_targets
    engine.backward(loss)
    return loss.item(), [p.grad.clone() for p in engine.model.parameters()]


def test_gradient_checkpointing_and_bf16_on_packed_batches(world_dir, tokenizer):
    from srppo_fast.batching import pack_sequences

    data = load_lm_data("world:demos", tokenizer, kind="sft", loss_on="response", max_seq_len=128,
                        world_dir=world_dir)
    batch = pack_sequences(data, np.array([0, 3, 5]))
    torch.manual_seed(0)
    state = make_model(tokenizer).state_dict()

    def fresh():
        model = make_model(tokenizer)
        model.load_state_dict(state)
        return model

    loss, grads = _packed_grads(fresh(), batch, {})
    ckpt_model = fresh()
    ckpt_loss, ckpt_grads = _packed_grads(ckpt_model, batch, {"gradient_checkpointing": True})
    assert ckpt_model.is_gradient_checkpointing
    assert ckpt_loss == pytest.approx(loss, rel=1e-6)
    for a, b in zip(grads, ckpt_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    bf16_loss, bf16_grads = _packed_grads(fresh(), batch, {"precision": "bf16"})
    assert bf16_loss != loss  # autocast really ran in bf16
    assert bf16_loss == pytest.approx(loss, rel=2e-2)
    assert all(g.dtype == torch.float32 for g in bf16_grads)  # weights and grads stay fp32
