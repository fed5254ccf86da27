"""Update engine: schedule shape, decay groups, accumulation over micro-batches = one big batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from srppo_fast.config import OptimConfig
from srppo_fast.engine import TorchEngine, lr_lambda, param_groups
from srppo_fast.stages.lm import EpochSampler, lm_train_step
from srppo_fast.tokens import load_lm_data

from .helpers import make_model


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


def _step_and_grads(tokenizer, data, token_budget: int) -> tuple[dict, list[torch.Tensor]]:
    """One lm_train_step over the first 8 sequences from a fresh model: its stats, and the gradients the optimizer
    step saw (captured by wrapping optimizer.step)."""
    torch.manual_seed(0)
    engine = TorchEngine(make_model(tokenizer), OptimConfig(lr=1e-2, warmup_ratio=0.0, grad_clip=0.0), 4,
                         torch.device("cpu"))
    grads: list[torch.Tensor] = []
    step = engine.optimizer.step

    def capture(*args, **kwargs):
        grads.extend(p.grad.clone() for p in engine.model.parameters())
        return step(*args, **kwargs)

    engine.optimizer.step = capture
    return lm_train_step(engine, data, np.arange(8), token_budget), grads


@pytest.mark.parametrize("budget", [64, 100000])
def test_micro_batch_split_does_not_change_the_gradient(world_dir, tokenizer, budget):
    """A step over 8 sequences accumulates the same gradient whether they are packed in one micro-batch
    or many (the loss is normalised by the step's target count, not per micro-batch)."""
    data = load_lm_data("world:demos", tokenizer, kind="sft", loss_on="response", max_seq_len=128,
                        world_dir=world_dir)
    (s1, g1), (s2, g2) = (_step_and_grads(tokenizer, data, b) for b in (budget, 10**6))
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
    params = [engine.masters.get(id(p), p) for p in engine.model.parameters()]  # bf16: the fp32 masters hold them
    return loss.item(), [p.grad.clone() for p in params]


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
    assert bf16_loss != loss  # the forward really ran in bf16
    assert bf16_loss == pytest.approx(loss, rel=2e-2)
    assert all(g.dtype == torch.float32 for g in bf16_grads)  # gradients accumulate in fp32 (the masters')
    for a, b in zip(grads, bf16_grads):
        assert float((a - b).norm() / a.norm()) < 0.05


def test_bf16_engine_keeps_fp32_masters_and_sums_micro_batches_in_fp32(tokenizer):
    """bf16: the module's parameters are bf16 (what every forward and the KV cache see), the optimizer steps fp32
    masters, the module is their rounding after each step, and micro-batch gradients are summed in fp32: a bf16
    running sum of 300 micro-batch gradients of 1.0 stalls at 256 (257 is not a bf16 number); fp32 gives 300."""
    torch.manual_seed(0)
    model = make_model(tokenizer)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    engine = TorchEngine(model, OptimConfig(lr=1e-3, warmup_ratio=0.0, grad_clip=0.0, schedule="constant"), 4,
                         torch.device("cpu"), precision="bf16")
    params = list(dict.fromkeys(engine.model.parameters()))
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers are never cast
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    masters = [engine.masters[id(p)] for p in params]
    assert all(m.dtype == torch.float32 for m in masters)
    assert all(torch.equal(m, start[k]) for k, m in zip([n for n, _ in engine.model.named_parameters()], masters))
    weight = params[1]
    for _ in range(300):
        weight.float().sum().backward()  # a gradient of 1.0 per element, per micro-batch
    grad = engine.masters[id(weight)].grad
    assert grad.dtype == torch.float32 and weight.grad is None
    assert torch.equal(grad, torch.full_like(grad, 300.0))
    engine.step()
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(params, masters))
    state = engine.full_state_dict()
    assert state["model.norm.weight"].dtype == torch.float32 and torch.equal(state["model.norm.weight"],
                                                                              engine.masters[id(model.model.norm.weight)])


def test_a_non_finite_step_is_skipped_and_counted(tiny_model):
    """A NaN gradient leaves the weights and Adam's moments as they were; the schedule still advances; the
    streak resets at the next finite step."""
    engine = TorchEngine(tiny_model, OptimConfig(lr=1e-2, warmup_ratio=0.0, schedule="linear"), total_steps=4,
                         device=torch.device("cpu"))
    params = [p for p in tiny_model.parameters()]

    def backward(value: float) -> None:
        loss = sum((p * value).sum() for p in params)
        loss.backward()

    backward(1.0)
    assert engine.step()["skipped"] == 0.0
    before = [p.detach().clone() for p in params]
    moments = {k: v.clone() for k, v in engine.optimizer.state[params[0]].items()}
    backward(float("nan"))
    stats = engine.step()
    assert stats["skipped"] == 1.0 and not math.isfinite(stats["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(moments[k], engine.optimizer.state[params[0]][k]) for k in moments)
    backward(1.0)
    assert engine.step(loss_finite=False)["skipped"] == 1.0  # a non-finite loss alone also skips
    assert (engine.nonfinite_steps, engine.nonfinite_streak, engine.steps_done) == (2, 2, 3)
    assert engine.scheduler.get_last_lr()[0] == pytest.approx(1e-2 * (1 - 0.9 * 3 / 3))  # schedule moved on
    backward(1.0)
    engine.step()
    assert (engine.nonfinite_steps, engine.nonfinite_streak) == (2, 0)
    assert not all(torch.equal(a, b) for a, b in zip(before, params))
    restored = TorchEngine(tiny_model, OptimConfig(), total_steps=4, device=torch.device("cpu"))
    restored.load_state_dict(engine.state_dict())
    assert (restored.nonfinite_steps, restored.nonfinite_streak) == (2, 0)


def test_check_divergence_names_the_step_and_the_last_save(tiny_model):
    from srppo_fast.engine import check_divergence
    from srppo_fast.errors import TrainingError

    engine = TorchEngine(tiny_model, OptimConfig(lr=3.0), total_steps=4, device=torch.device("cpu"))
    engine.nonfinite_streak = 2
    check_divergence(engine, "sft", 7, 3, "ckpt (step 5)")  # below the limit: nothing
    engine.nonfinite_streak = 3
    with pytest.raises(TrainingError, match=r"sft: 3 optimizer steps in a row .* at step 7.*ckpt \(step 5\).*peak 3"):
        check_divergence(engine, "sft", 7, 3, "ckpt (step 5)")
    check_divergence(engine, "sft", 7, 0, "ckpt")  # 0: never stop


def test_loaded_weights_live_in_aligned_memory_of_their_own(tiny_model, tmp_path, tokenizer):
    """safetensors leaves weights in buffers aligned only to the heap's whim (16 bytes), which MKL may round
    differently from 64-byte aligned ones: a resumed run would then drift from an uninterrupted one."""
    from srppo_fast.config import ModelConfig
    from srppo_fast.modeling import load_critic, load_model

    tiny_model.save_pretrained(tmp_path / "m")
    for model in (load_model(str(tmp_path / "m"), ModelConfig()), load_critic(str(tmp_path / "m"), ModelConfig())):
        tensors = list(model.parameters()) + list(model.buffers())
        assert all(t.data_ptr() % 64 == 0 for t in tensors)
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in model.parameters())
    model = load_model(str(tmp_path / "m"), ModelConfig())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied weights stay tied
