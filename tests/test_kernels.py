"""Triton kernels against their references: values and gradients, awkward shapes, every dtype.

On a CPU machine the kernels run through TRITON_INTERPRET=1 (set by conftest) at small sizes; the
cases marked `gpu` run the real sizes (V = 128256 / 151936, 16k tokens) and skip without CUDA.
Tolerances: fp32 compares with the fp32 reference at 1e-4 x scale; bf16/fp16 follow the three-way
rule |triton - ref| <= 2 |torch - ref| + atol, where torch is the same computation in the input dtype.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from .helpers import require

require("triton")

from srppo_fast.ops import (  # noqa: E402
    coherent_gae,
    coherent_gae_ref,
    gae,
    gae_ref,
    linear_token_logprobs,
    linear_token_logprobs_ref,
    ppo_loss,
    token_logprobs,
    token_logprobs_ref,
    value_loss,
    value_loss_ref,
)
from srppo_fast.ops._triton import resolve_impl  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA device")
# Measured: the interpreter truncates fp32 -> bf16/fp16 stores (2.0460 -> 2.03125, where the GPU and torch
# round to 2.046875), so on the CPU a low-precision result may be one unit in the last place off, not half.
TRUNCATING_STORES = not GPU
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def close(got: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor | None = None, atol: float = 1e-5):
    """fp32: |got - ref| <= 1e-4 * max(1, |ref|max). Lower precision: the three-way rule."""
    low_dtype = got.dtype
    got, ref = got.float(), ref.float()
    if same_dtype is None:
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        torch.testing.assert_close(got, ref, atol=1e-4 * scale, rtol=0)
        return
    bound = 2 * (same_dtype.float() - ref).abs() + atol
    if TRUNCATING_STORES and low_dtype in ULP:
        bound = bound + ULP[low_dtype] * ref.abs()
    excess = (got - ref).abs() - bound
    i = int(excess.argmax())
    assert float(excess.max()) <= 0, (f"three-way rule broken by {float(excess.max()):.3g} at flat index {i}: "
                                      f"got {float(got.flatten()[i])}, ref {float(ref.flatten()[i])}, "
                                      f"same-dtype {float(same_dtype.flatten()[i])}")


# ------------------------------------------------------------------------------------------------
# token_logprobs

SHAPES = [(1, 7), (5, 7), (3, 16), (2, 8191), (2, 8192), (2, 8193), (6, 3000)]  # block is 8192


def _inputs(N, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 4).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    if N > 1:
        labels[1] = -100  # an ignored row
    return logits.to(DEVICE), labels.to(DEVICE)


def _run(fn, logits, labels, temperature, entropy, grads):
    x = logits.clone().requires_grad_()
    out = fn(x, labels, temperature, return_entropy=entropy)
    logp, ent = out if entropy else (out, None)
    loss = (logp * grads[0]).sum() + ((ent * grads[1]).sum() if entropy else 0)
    loss.backward()
    return logp.detach(), (ent.detach() if entropy else None), x.grad


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (0.7, True)])
def test_token_logprobs_matches_reference(N, V, dtype, temperature, entropy):
    logits, labels = _inputs(N, V, dtype)
    grads = (torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE))
    tri = _run(lambda *a, **k: token_logprobs(*a, **k, impl="triton"), logits, labels, temperature, entropy, grads)
    ref = _run(lambda x, y, t, **k: token_logprobs_ref(x.float(), y, t, **k), logits.float(), labels, temperature,
               entropy, grads)
    assert tri[0].dtype == torch.float32 and tri[2].dtype == dtype
    if dtype == torch.float32:
        close(tri[0], ref[0])
        if entropy:
            close(tri[1], ref[1])
        close(tri[2], ref[2])
    else:  # the same computation in the input dtype, for the three-way rule
        def same_dtype(x, y, t, return_entropy):
            logp_all = torch.log_softmax(x / t, -1)  # in bf16/fp16
            safe = torch.where(y != -100, y, 0)
            logp = torch.where(y != -100, logp_all.gather(-1, safe[:, None])[:, 0], 0).float()
            return (logp, -(logp_all.exp() * logp_all).sum(-1).float()) if return_entropy else logp

        low = _run(same_dtype, logits, labels, temperature, entropy, grads)
        close(tri[0], ref[0], low[0])
        if entropy:
            close(tri[1], ref[1], low[1])
        close(tri[2], ref[2], low[2], atol=1e-2)
    assert float(tri[0][1 if N > 1 else 0]) == 0.0 or N == 1  # the ignored row


def test_logprobs_are_never_positive():
    logits = torch.zeros(3, 64, device=DEVICE)
    logits[:, 5] = torch.tensor([30.0, 80.0, 200.0])  # one logit dominates: lse ~ logit within rounding
    labels = torch.full((3,), 5, device=DEVICE)
    logp = token_logprobs(logits, labels, impl="triton")
    assert (logp <= 0).all()
    assert float(logp.min()) > -1e-6


def test_all_ignored_rows_and_empty_input():
    logits, labels = _inputs(4, 300, torch.float32)
    labels[:] = -100
    x = logits.clone().requires_grad_()
    logp = token_logprobs(x, labels, impl="triton")
    assert (logp == 0).all()
    logp.sum().backward()
    assert (x.grad == 0).all()
    empty = token_logprobs(torch.zeros(0, 10, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE),
                           impl="triton")
    assert empty.shape == (0,)


def test_inplace_backward_writes_the_gradient_over_the_logits():
    logits, labels = _inputs(4, 1000, torch.float32)
    base = logits.clone().requires_grad_()
    expect = torch.autograd.grad(token_logprobs(base, labels, impl="triton").sum(), base)[0]
    leaf = logits.clone().requires_grad_()
    inter = leaf * 1.0  # a non-leaf whose storage the backward may reuse
    token_logprobs(inter, labels, impl="triton", inplace_backward=True).sum().backward()
    close(leaf.grad, expect)


def test_leading_dimensions_are_kept():
    logits, labels = _inputs(6, 50, torch.float32)
    out = token_logprobs(logits.view(2, 3, 50), labels.view(2, 3), impl="triton")
    assert out.shape == (2, 3)
    close(out.reshape(-1), token_logprobs_ref(logits, labels))


# ------------------------------------------------------------------------------------------------
# linear_token_logprobs


@pytest.mark.parametrize("N,H,V,chunk_bytes", [(37, 16, 300, 64 * 300 * 4), (130, 8, 7, 1 << 30), (9, 32, 1000, 1),
                                               (70, 16, 513, 10 * 513 * 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_token_logprobs_matches_reference(N, H, V, chunk_bytes, dtype):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, H, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).to(DEVICE)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    labels[0] = -100
    up = torch.randn(N, generator=g).to(DEVICE), torch.randn(N, generator=g).to(DEVICE)

    def run(fn, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp, ent = fn(h, w, labels, 0.8, True)
        ((logp * up[0]).sum() + (ent * up[1]).sum()).backward()
        return logp.detach(), ent.detach(), h.grad, w.grad

    tri = run(lambda *a: linear_token_logprobs(*a, impl="triton", chunk_bytes=chunk_bytes), hidden, weight)
    ref = run(linear_token_logprobs_ref, hidden.float(), weight.float())
    if dtype == torch.float32:
        for a, b in zip(tri, ref):
            close(a, b)
    else:
        low = run(linear_token_logprobs_ref, hidden, weight)  # logits in bf16, log-softmax upcast
        for a, b, c in zip(tri, ref, low):
            close(a, b, c, atol=2e-2)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_token_logprobs_under_autocast_computes_both_passes_in_bf16(impl):
    """fp32 master weights and activations under bf16 autocast (a trainer's update): the fused op computes its
    forward logits AND the backward's recomputed logits in bf16, as a plain autocast matmul would. Its gradients
    are within bf16's reach of the fp64 reference: the three-way rule against the same function run by plain
    autocast ops (bf16 logits, fp32 log-softmax). (Recomputing fp32 logits in the backward against the
    forward's bf16 log-sum-exp gives probabilities that do not sum to one, far outside it.)"""
    N, H, V = 48, 32, 700
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, H, generator=g).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) * 2.0).to(DEVICE)  # logits of a trained LM's spread (|z| ~ 10-30)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    up = torch.randn(N, generator=g).to(DEVICE), torch.randn(N, generator=g).to(DEVICE)
    mms = []

    class RecordMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                mms.append(args[0].dtype if func is torch.ops.aten.mm.default else args[1].dtype)
            return func(*args, **(kwargs or {}))

    def run(fn, h, w, dtype=None):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype is not None):
            logp, ent = fn(h, w, labels, 0.9, True)
        ((logp * up[0]).sum() + (ent * up[1]).sum()).backward()
        assert h.grad.dtype == w.grad.dtype == torch.float32  # fp32 leaves get fp32 gradients
        return logp.detach(), ent.detach(), h.grad, w.grad

    with RecordMatmuls():
        got = run(lambda *a: linear_token_logprobs(*a, impl=impl, chunk_bytes=16 * V * 2), hidden, weight,
                  torch.bfloat16)
    assert mms and set(mms) == {torch.bfloat16}, mms  # every [C,H]x[H,V] product, forward and backward, in bf16
    ref = run(lambda h, w, *a: linear_token_logprobs_ref(h.double(), w.double(), *a), hidden, weight)
    autocast_ops = run(linear_token_logprobs_ref, hidden, weight, torch.bfloat16)
    for what, a, b, c in zip(("logp", "entropy", "grad hidden", "grad weight"), got, ref, autocast_ops):
        # the three-way rule in norm (elementwise, the interpreter's truncating bf16 stores bias the sums over V):
        # measured 0.020 against 0.019 for the autocast ops; fp32 recomputed logits against a bf16 log-sum-exp
        # gave 0.11 for both gradients
        err, reach = float((a - b.float()).norm() / b.norm()), float((c - b.float()).norm() / b.norm())
        assert err <= 2 * reach, f"{what}: relative error {err:.3g}, beyond twice the autocast ops' {reach:.3g}"


def test_linear_logprobs_frozen_path_keeps_no_graph():
    hidden, weight = torch.randn(20, 8, device=DEVICE), torch.randn(50, 8, device=DEVICE)
    labels = torch.randint(0, 50, (20,), device=DEVICE)
    with torch.no_grad():
        out = linear_token_logprobs(hidden, weight, labels, impl="triton", chunk_bytes=7 * 50 * 4)
    assert not out.requires_grad
    close(out, linear_token_logprobs_ref(hidden, weight, labels))


# ------------------------------------------------------------------------------------------------
# gae and the fused coherent reward


def _ragged(B, T, seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    if empty_row and B > 2:
        lengths[2] = 0  # an all-masked row
    mask = torch.arange(T)[None] < lengths[:, None]
    return g, mask


@pytest.mark.parametrize("B,T", [(3, 1), (4, 7), (5, 64), (3, 1023), (3, 1024), (2, 1025)])
def test_gae_padded_matches_reference(B, T):
    g, mask = _ragged(B, T)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    adv, ret = gae(rewards.to(DEVICE), values.to(DEVICE), mask.to(DEVICE), 0.97, 0.9, impl="triton")
    ref_adv, ref_ret = gae_ref(rewards, values, mask, 0.97, 0.9)
    close(adv.cpu(), ref_adv)
    close(ret.cpu(), ref_ret)
    if B > 2:
        assert (adv[2] == 0).all() and (ret[2] == 0).all()


def test_gae_packed_matches_padded():
    lengths = torch.tensor([3, 1, 7, 1, 1030])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(int(cu[-1]), generator=g), torch.randn(int(cu[-1]), generator=g)
    adv, ret = gae(rewards.to(DEVICE), values.to(DEVICE), None, 0.99, 0.95, impl="triton", cu_seqlens=cu.to(DEVICE))
    for i in range(len(lengths)):
        s, e = int(cu[i]), int(cu[i + 1])
        ra, rr = gae_ref(rewards[None, s:e], values[None, s:e], torch.ones(1, e - s, dtype=torch.bool), 0.99, 0.95)
        close(adv[s:e].cpu(), ra[0])
        close(ret[s:e].cpu(), rr[0])


def test_gae_kernel_against_textbook_loop():
    rng = random.Random(7)
    B, T = 4, 37
    lengths = [rng.randint(1, T) for _ in range(B)]
    r = [[rng.uniform(-2, 2) for _ in range(T)] for _ in range(B)]
    v = [[rng.uniform(-2, 2) for _ in range(T)] for _ in range(B)]
    mask = torch.tensor([[t < lengths[b] for t in range(T)] for b in range(B)])
    adv, _ = gae(torch.tensor(r).to(DEVICE), torch.tensor(v).to(DEVICE), mask.to(DEVICE), 0.9, 0.8, impl="triton")
    for b in range(B):
        for t in range(lengths[b]):  # A_t = sum_k (gamma lam)^(k - t) delta_k
            expect = sum((0.9 * 0.8) ** (k - t) * (r[b][k] + 0.9 * (v[b][k + 1] if k + 1 < lengths[b] else 0.0)
                                                    - v[b][k]) for k in range(t, lengths[b]))
            assert float(adv[b, t]) == pytest.approx(expect, abs=1e-4)


@pytest.mark.parametrize("granularity", ["sequence", "token"])
@pytest.mark.parametrize("with_values", [True, False])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_coherent_gae_matches_reference(granularity, with_values, kl):
    B, T = 5, 40
    g, mask = _ragged(B, T, seed=4)
    old, ref, sft, pt = (torch.randn(B, T, generator=g) - 2 for _ in range(4))
    values = torch.randn(B, T, generator=g) if with_values else None
    kw = dict(kl_coef=0.3, kl_estimator=kl, granularity=granularity, scale=1.5, token_clip=1.0, length_normalize=True,
              seq_scale=torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0]), seq_shift=torch.tensor([0.0, -1.0, 0.3, 0.0, 0.2]),
              seq_clip=2.0, gamma=0.95, lam=0.9)
    dev = lambda x: x.to(DEVICE) if x is not None else None  # noqa: E731
    got = coherent_gae(*(dev(x) for x in (old, ref, sft, pt, values, mask)), impl="triton",
                       **{k: (dev(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    expect = coherent_gae_ref(old, ref, sft, pt, values, mask, **kw)
    for a, b in zip(got, expect):
        close(a.cpu(), b)


def test_coherent_gae_defaults():
    B, T = 3, 9
    _, mask = _ragged(B, T, seed=5, empty_row=False)
    x = [torch.randn(B, T) for _ in range(5)]
    got = coherent_gae(*[t.to(DEVICE) for t in x], mask.to(DEVICE), impl="triton")
    for a, b in zip(got, coherent_gae_ref(*x, mask)):
        close(a.cpu(), b)


# ------------------------------------------------------------------------------------------------
# ppo_loss


def _ppo_inputs(N, seed):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(N, generator=g) * 0.3 - 1
    d = dict(old_logp=logp + torch.randn(N, generator=g) * 0.3, advantages=torch.randn(N, generator=g),
             mask=torch.rand(N, generator=g) > 0.2, ref_logp=logp + torch.randn(N, generator=g) * 0.2,
             entropy=torch.rand(N, generator=g), values=torch.randn(N, generator=g),
             returns=torch.randn(N, generator=g))
    d["old_values"] = d["values"] + torch.randn(N, generator=g) * 0.3
    return logp, {k: v.to(DEVICE) for k, v in d.items()}


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_ppo_loss_backward_from_one_loss_reaches_only_its_model(impl):
    """Backpropagating the actor's loss alone must not send gradients (zeros) into the critic's graph, nor the
    critic's into the actor's: the DeepSpeed engine backpropagates the two losses one engine at a time."""
    logp0, d = _ppo_inputs(64, seed=3)
    for which in ("actor", "critic"):
        logp = logp0.to(DEVICE).clone().requires_grad_()
        values = d["values"].clone().requires_grad_()
        actor, critic, _ = ppo_loss(logp, d["old_logp"], d["advantages"], d["mask"], impl=impl, values=values,
                                    old_values=d["old_values"], returns=d["returns"])
        (actor if which == "actor" else critic).backward()
        assert (logp.grad is not None) == (which == "actor") and (values.grad is not None) == (which == "critic")


@pytest.mark.parametrize("N", [1, 7, 1024, 1025, 3000])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("options", ["all", "policy_only", "no_value_clip", "dual_clip"])
def test_ppo_loss_matches_reference(N, kl, options):
    logp0, d = _ppo_inputs(N, seed=N)
    kwargs = dict(clip_eps=0.2, clip_eps_high=0.28, value_clip=0.2, entropy_coef=0.01, kl_coef=0.1,
                  kl_estimator=kl, normalizer=N * 0.9)
    if options == "no_value_clip":
        kwargs["value_clip"] = None
    if options == "dual_clip":  # binds where A < 0 and r > 1.5: about 1 token in 12 here
        kwargs["dual_clip"] = 1.5

    def run(impl):
        logp = logp0.to(DEVICE).clone().requires_grad_()
        ent = d["entropy"].clone().requires_grad_()
        values = d["values"].clone().requires_grad_() if options != "policy_only" else None
        extra = dict(values=values, old_values=d["old_values"], returns=d["returns"]) if values is not None else {}
        actor, critic, stats = ppo_loss(logp, d["old_logp"], d["advantages"], d["mask"], impl=impl, entropy=ent,
                                        ref_logp=d["ref_logp"], **extra, **kwargs)
        total = 1.5 * actor + (0.7 * critic if critic is not None else 0)
        total.backward()
        return actor, critic, stats, logp.grad, ent.grad, values.grad if values is not None else None

    tri, ref = run("triton"), run("torch")
    close(tri[0].detach().cpu(), ref[0].detach().cpu())
    if ref[1] is not None:
        close(tri[1].detach().cpu(), ref[1].detach().cpu())
    assert sorted(tri[2]) == sorted(ref[2])
    for k in ref[2]:
        close(tri[2][k].cpu(), ref[2][k].cpu())
    for a, b in zip(tri[3:], ref[3:]):
        if b is not None:
            close(a.cpu(), b.cpu())


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_loss_extreme_log_ratios_match_reference(dual_clip):
    """A tenth of the tokens with |logp - old_logp| between 25 and 100 (beyond the bound of 20): both
    implementations stay finite and agree, the gradient of those tokens is 0, and the value clip counts the
    same tokens in both."""
    N = 1025
    logp0, d = _ppo_inputs(N, seed=5)
    g = torch.Generator().manual_seed(6)
    far = torch.rand(N, generator=g) < 0.1
    shift = (torch.rand(N, generator=g) * 75 + 25) * torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0)
    old_logp = torch.where(far.to(DEVICE), logp0.to(DEVICE) - shift.to(DEVICE), d["old_logp"])

    def run(impl):
        logp = logp0.to(DEVICE).clone().requires_grad_()
        values = d["values"].clone().requires_grad_()
        actor, critic, stats = ppo_loss(logp, old_logp, d["advantages"], d["mask"], impl=impl, values=values,
                                        old_values=d["old_values"], returns=d["returns"], dual_clip=dual_clip)
        (actor + critic).backward()
        return [actor.detach(), critic.detach(), *(stats[k] for k in sorted(stats)), logp.grad, values.grad]

    tri, ref = run("triton"), run("torch")
    assert all(torch.isfinite(x).all() for x in tri + ref)
    for a, b in zip(tri, ref):
        close(a.cpu(), b.cpu())
    assert (tri[-2].cpu()[far] == 0).all() and (ref[-2].cpu()[far] == 0).all()
    assert float(tri[-2].abs().sum()) > 0  # the other tokens do have a slope
    clip_frac = sorted(["pg_loss", "clip_frac", "approx_kl", "value_loss", "value_clip_frac"] +
                       (["dual_clip_frac"] if dual_clip else [])).index("value_clip_frac")
    n = int(d["mask"].sum())  # the same tokens counted (the fractions are sums of 1/n in different orders)
    assert round(float(tri[2 + clip_frac]) * n) == round(float(ref[2 + clip_frac]) * n) > 0


def test_value_loss_alone_matches_reference():
    _, d = _ppo_inputs(500, seed=9)
    grads = []
    for fn in (lambda **k: value_loss(**k, impl="triton"), value_loss_ref):
        v = d["values"].clone().requires_grad_()
        loss, stats = fn(values=v, old_values=d["old_values"], returns=d["returns"], mask=d["mask"], value_clip=0.1)
        loss.backward()
        grads.append((loss.detach(), stats["value_clip_frac"], v.grad))
    for a, b in zip(*grads):
        close(a.cpu(), b.cpu())


def test_ppo_kernel_against_textbook_loop():
    rng = random.Random(11)
    N = 50
    logp = [rng.uniform(-3, 0) for _ in range(N)]
    old = [x + rng.uniform(-0.5, 0.5) for x in logp]
    adv = [rng.uniform(-2, 2) for _ in range(N)]
    actor, _, _ = ppo_loss(torch.tensor(logp).to(DEVICE), torch.tensor(old).to(DEVICE), torch.tensor(adv).to(DEVICE),
                           torch.ones(N, dtype=torch.bool, device=DEVICE), clip_eps=0.2, impl="triton")
    terms = []
    for lp, o, a in zip(logp, old, adv):
        ratio = math.exp(lp - o)
        terms.append(-min(ratio * a, max(min(ratio, 1.2), 0.8) * a))
    assert float(actor) == pytest.approx(sum(terms) / N, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# one mask rule (a token counts where mask != 0, whatever its dtype) and any memory layout, in both
# implementations: every case must give the bool-mask, contiguous-input reference

MASK_VARIANTS = ["bool", "float_cols", "float_offset", "int_transposed", "weights", "weights_cols"]


def _strided(x: torch.Tensor, how: str = "cols") -> torch.Tensor:
    """x [B, T] again, in a non-contiguous layout built on the device (.to(device) would densify it):
    every other column of a wider buffer, an offset slice (row stride T + 1), or a transpose."""
    x = x.to(DEVICE)
    if how == "transposed":
        return x.t().contiguous().t()
    B, T = x.shape
    if how == "offset":
        wide = torch.full((B, T + 1), 7.0, dtype=x.dtype, device=DEVICE)
        wide[:, 1:] = x
        return wide[:, 1:]
    wide = torch.full((B, 2 * T), 7.0, dtype=x.dtype, device=DEVICE)  # 7: garbage between the columns
    wide[:, ::2] = x
    return wide[:, ::2]


def _mask_variant(mask: torch.Tensor, variant: str) -> torch.Tensor:
    """The token set of the bool mask [B, T] as another dtype, value set or layout."""
    weights = torch.where(torch.arange(mask.numel()).view(mask.shape) % 3 == 0, 0.5, 2.0)  # nonzero, not 1
    out = {"bool": lambda: mask.to(DEVICE), "float_cols": lambda: _strided(mask.float()),
           "float_offset": lambda: _strided(mask.float(), "offset"),
           "int_transposed": lambda: _strided(mask.int(), "transposed"),
           "weights": lambda: (mask.float() * weights).to(DEVICE),
           "weights_cols": lambda: _strided(mask.float() * weights)}[variant]()
    assert torch.equal((out != 0).cpu(), mask)
    assert out.is_contiguous() == (variant in ("bool", "weights"))
    return out


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("variant", MASK_VARIANTS)
def test_gae_mask_rule_and_layouts(variant, impl):
    B, T = 4, 11
    g, mask = _ragged(B, T, seed=6)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    expect = gae_ref(rewards, values, mask, 0.9, 0.8)
    got = gae(_strided(rewards, "transposed"), _strided(values, "offset"), _mask_variant(mask, variant), 0.9, 0.8,
              impl=impl)
    for a, b in zip(got, expect):
        close(a.cpu(), b)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("variant", ["float_strided", "weights"])
def test_gae_packed_mask_rule_and_layouts(variant, impl):
    lengths = torch.tensor([3, 1, 7])
    cu = torch.zeros(4, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    N = int(cu[-1])
    g = torch.Generator().manual_seed(8)
    rewards, values = torch.randn(N, generator=g), torch.randn(N, generator=g)
    expect = gae(rewards, values, None, 0.99, 0.95, impl="torch", cu_seqlens=cu)  # every token counts
    if variant == "weights":
        mask = torch.where(torch.arange(N) % 2 == 0, 0.5, 2.0).to(DEVICE)
    else:
        mask = torch.zeros(2 * N, device=DEVICE)
        mask[::2] = 1.0
        mask = mask[::2]
    strided = lambda x: torch.stack([x, x + 7], 1).to(DEVICE)[:, 0]  # noqa: E731 (stride 2)
    got = gae(strided(rewards), strided(values), mask, 0.99, 0.95, impl=impl, cu_seqlens=cu.to(DEVICE))
    for a, b in zip(got, expect):
        close(a.cpu(), b)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("variant", MASK_VARIANTS)
def test_coherent_gae_mask_rule_and_layouts(variant, impl):
    B, T = 4, 9
    g, mask = _ragged(B, T, seed=7)
    old, ref, sft, pt = (torch.randn(B, T, generator=g) - 2 for _ in range(4))
    values = torch.randn(B, T, generator=g)
    kw = dict(kl_coef=0.3, kl_estimator="k3", granularity="token", scale=1.5, token_clip=1.0, length_normalize=True,
              seq_scale=torch.tensor([1.0, 0.5, 2.0, 0.5]), seq_shift=torch.tensor([0.0, -1.0, 0.3, 0.2]),
              gamma=0.95, lam=0.9)
    expect = coherent_gae_ref(old, ref, sft, pt, values, mask, **kw)
    kw["seq_scale"] = torch.stack([kw["seq_scale"]] * 2, 1).to(DEVICE)[:, 0]  # stride 2
    kw["seq_shift"] = kw["seq_shift"].to(DEVICE)
    got = coherent_gae(_strided(old), _strided(ref, "offset"), _strided(sft, "transposed"), pt.to(DEVICE),
                       _strided(values), _mask_variant(mask, variant), impl=impl, **kw)
    for a, b in zip(got, expect):
        close(a.cpu(), b)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("variant", MASK_VARIANTS)
def test_ppo_loss_mask_rule_and_layouts(variant, impl):
    B, T = 3, 10
    logp0, d = _ppo_inputs(B * T, seed=12)
    d = {k: v.cpu().view(B, T) for k, v in d.items()}
    mask = d.pop("mask")
    kwargs = dict(clip_eps=0.2, value_clip=0.2, entropy_coef=0.01, kl_coef=0.1, kl_estimator="k3")

    def run(impl, mask, layout):
        logp = layout(logp0.view(B, T)).detach().requires_grad_()
        ent = layout(d["entropy"]).detach().requires_grad_()
        values = layout(d["values"]).detach().requires_grad_()
        rest = {k: layout(d[k]) for k in ("old_logp", "advantages", "ref_logp", "old_values", "returns")}
        actor, critic, stats = ppo_loss(logp, rest.pop("old_logp"), rest.pop("advantages"), mask, impl=impl,
                                        entropy=ent, values=values, **rest, **kwargs)
        (1.5 * actor + 0.7 * critic).backward()
        return [actor, critic, *(stats[k] for k in sorted(stats)), logp.grad, ent.grad, values.grad], sorted(stats)

    expect, names = run("torch", mask, lambda x: x.clone())
    got, got_names = run(impl, _mask_variant(mask, variant), _strided)
    assert got_names == names
    for a, b in zip(got, expect):
        close(a.detach().cpu(), b.detach().cpu())
    # the off-mask tokens get no gradient
    assert (got[-3].cpu()[~mask] == 0).all() and (got[-1].cpu()[~mask] == 0).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("variant", MASK_VARIANTS)
def test_value_loss_mask_rule_and_layouts(variant, impl):
    B, T = 3, 10
    _, d = _ppo_inputs(B * T, seed=13)
    d = {k: v.cpu().view(B, T) for k, v in d.items()}

    def run(impl, mask, layout):
        v = layout(d["values"]).detach().requires_grad_()
        loss, stats = value_loss(v, layout(d["old_values"]), layout(d["returns"]), mask, impl=impl, value_clip=0.1)
        loss.backward()
        return loss, stats["value_clip_frac"], stats["value_loss"], v.grad

    for a, b in zip(run(impl, _mask_variant(d["mask"], variant), _strided), run("torch", d["mask"], torch.clone)):
        close(a.detach().cpu(), b.detach().cpu())


@pytest.mark.parametrize("logits_layout", ["cols", "transposed", "vocab_slice"])
def test_token_logprobs_layouts(logits_layout):
    N, V = 6, 37
    logits, labels = _inputs(N, V, torch.float32, seed=3)
    logits, labels = logits.cpu(), labels.cpu()
    up = (torch.randn(N), torch.randn(N))

    def run(fn, x, y):
        x = x.detach().requires_grad_()  # a leaf in x's own layout (clone would densify some)
        logp, ent = fn(x, y, 0.9, return_entropy=True)
        ((logp * up[0].to(x.device)).sum() + (ent * up[1].to(x.device)).sum()).backward()
        return logp.detach(), ent.detach(), x.grad

    ref = run(token_logprobs_ref, logits, labels)
    if logits_layout == "vocab_slice":  # rows of a wider vocabulary: row stride V + 5, columns contiguous
        wide = torch.full((N, V + 5), 50.0, device=DEVICE)
        wide[:, :V] = logits
        strided_logits = wide[:, :V]
    else:
        strided_logits = _strided(logits, logits_layout)
    strided_labels = _strided(labels[:, None].expand(N, 2))[:, 1]  # [N], stride 4
    assert not strided_labels.is_contiguous() and strided_logits.stride() != (V, 1)
    tri = run(lambda *a, **k: token_logprobs(*a, **k, impl="triton"), strided_logits, strided_labels)
    for a, b in zip(tri, ref):
        close(a.cpu(), b)


def test_linear_token_logprobs_layouts():
    N, H, V = 9, 8, 33
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100
    up = torch.randn(N, generator=g), torch.randn(N, generator=g)

    def run(fn, h, w, y):
        h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
        logp, ent = fn(h, w, y, 0.8, True)
        ((logp * up[0].to(h.device)).sum() + (ent * up[1].to(h.device)).sum()).backward()
        return logp, ent, h.grad, w.grad

    expect = run(linear_token_logprobs_ref, hidden, weight, labels)
    got = run(lambda *a: linear_token_logprobs(*a, impl="triton", chunk_bytes=4 * V * 4), _strided(hidden),
              _strided(weight, "transposed"), _strided(labels[:, None].expand(N, 2))[:, 1])
    for a, b in zip(got, expect):
        close(a.detach().cpu(), b.detach().cpu())


def test_inplace_backward_on_logits_whose_rows_share_storage():
    # expanded logits (row stride 0): the in-place backward must not write every row's gradient into one row
    N, V = 4, 50
    leaf = torch.randn(1, V, device=DEVICE).requires_grad_()
    labels = torch.tensor([3, 7, -100, 49], device=DEVICE)
    token_logprobs(leaf.expand(N, V), labels, impl="triton", inplace_backward=True).sum().backward()
    expect = torch.autograd.grad(token_logprobs_ref(leaf.expand(N, V), labels).sum(), leaf)[0]
    close(leaf.grad, expect)


def test_launchers_reject_mismatched_shapes():
    x, m = torch.zeros(2, 5, device=DEVICE), torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="advantages has shape"):
        ppo_loss(x, x, torch.zeros(2, 1, device=DEVICE), m, impl="triton")
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        ppo_loss(x, x, x, m, impl="triton", normalizer=0)
    with pytest.raises(ValueError, match="mask has shape"):
        gae(x, x, m[:, :4], impl="triton")
    with pytest.raises(ValueError, match="seq_scale and seq_shift are"):
        coherent_gae(x, x, x, x, None, m, seq_scale=torch.ones(3, device=DEVICE), impl="triton")


def test_ppo_kernel_approx_kl_hand_case():
    # samples from pi_old, x = logp - old_logp: k3 of KL(pi_old || pi) = exp(x) - 1 - x
    # x = ln [1.5, 0.5, 1] -> [0.5 - ln 1.5, -0.5 + ln 2, 0] = [0.0945349, 0.1931472, 0]; the 4th is masked
    logp = torch.log(torch.tensor([1.5, 0.5, 1.0, 100.0])).to(DEVICE)
    _, _, stats = ppo_loss(logp, torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE),
                           torch.tensor([True, True, True, False], device=DEVICE), impl="triton")
    assert float(stats["approx_kl"]) == pytest.approx((0.0945349 + 0.1931472) / 3, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# the impl switch


def test_impl_switch(monkeypatch, caplog):
    cpu, here = torch.zeros(1), torch.zeros(1, device=DEVICE)
    monkeypatch.delenv("SRPPO_FAST_IMPL", raising=False)
    assert resolve_impl("auto", "op_a", here) == ("triton" if GPU else "torch")
    assert resolve_impl("auto", "op_a", cpu) == "torch"  # CPU tensors take PyTorch, also on a GPU machine
    monkeypatch.setenv("SRPPO_FAST_IMPL", "triton")
    assert resolve_impl("auto", "op_b", here) == "triton"
    assert resolve_impl("torch", "op_b", here) == "torch"  # an explicit choice wins over the variable
    monkeypatch.setenv("SRPPO_FAST_IMPL", "cuda")
    with pytest.raises(ValueError, match="SRPPO_FAST_IMPL='cuda'"):
        resolve_impl("auto", "op_c", here)
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("fast", "op_c", here)
    if not GPU:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="runs only under TRITON_INTERPRET=1"):
            resolve_impl("triton", "op_d", cpu)


# ------------------------------------------------------------------------------------------------
# real sizes on a GPU


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("V", [128256, 151936])
def test_token_logprobs_real_vocabularies(V):
    logits, labels = _inputs(16384, V, torch.bfloat16)
    grads = (torch.randn(16384, device=DEVICE), torch.randn(16384, device=DEVICE))
    tri = _run(lambda *a, **k: token_logprobs(*a, **k, impl="triton"), logits, labels, 1.0, True, grads)
    # the fp32 reference row block by row block: whole, its log_softmax and autograd need ~4 x 10 GiB
    refs = [_run(lambda x, y, t, **k: token_logprobs_ref(x, y, t, **k), logits[i:i + 2048].float(),
                 labels[i:i + 2048], 1.0, True, (grads[0][i:i + 2048], grads[1][i:i + 2048]))
            for i in range(0, 16384, 2048)]
    ref = [torch.cat([r[j] for r in refs]) for j in range(3)]
    close(tri[0], ref[0])
    close(tri[1], ref[1])
    # the bf16 gradient: the exact value rounded to bf16 (8 significant bits), so within one bf16 ulp of it
    err = (tri[2].float() - ref[2]).abs() - (2.0**-8 * ref[2].abs() + 1e-6)
    assert float(err.max()) <= 0, f"bf16 gradient off by {float(err.max()):.3g} beyond one ulp"


@gpu_only
@pytest.mark.gpu
def test_linear_token_logprobs_real_size_and_memory():
    N, H, V = 16384, 4096, 128256
    hidden = torch.randn(N, H, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(V, H, device=DEVICE, dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, V, (N,), device=DEVICE)
    torch.cuda.synchronize()
    before = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        logp = linear_token_logprobs(hidden, weight, labels, impl="triton")
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 0.5 * 2**30, f"{extra / 2**30:.2f} GiB extra"
    del before
    ref = torch.cat([linear_token_logprobs_ref(hidden[i:i + 2048].float(), weight.float(), labels[i:i + 2048])
                     for i in range(0, N, 2048)])
    close(logp, ref, same_dtype=torch.cat([linear_token_logprobs_ref(hidden[i:i + 2048], weight, labels[i:i + 2048])
                                           for i in range(0, N, 2048)]), atol=1e-2)


@gpu_only
@pytest.mark.gpu
def test_gae_real_size():
    B, T = 512, 2048
    _, mask = _ragged(B, T, seed=1)
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    adv, ret = gae(rewards.cuda(), values.cuda(), mask.cuda(), 1.0, 0.95, impl="triton")
    ref_adv, ref_ret = gae_ref(rewards.cuda(), values.cuda(), mask.cuda(), 1.0, 0.95)
    close(adv, ref_adv)
    close(ret, ref_ret)
