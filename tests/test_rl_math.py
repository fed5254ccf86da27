"""RL maths against hand-computed values and against textbook per-time-step loops."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from srppo_fast.advantages import (
    RunningMoments,
    baseline_advantages,
    compute_advantages,
    explained_variance,
    resolve_whiten,
)
from srppo_fast.ops import (
    coherent_rewards_ref,
    gae,
    kl_estimate,
    kl_shaped_rewards_ref,
    ppo_loss,
    returns_to_go,
    sequence_rewards_ref,
    value_loss,
)

T = torch.tensor
IMPLS = ["torch", "triton"]  # triton: the kernels through TRITON_INTERPRET=1 on CPU (conftest sets it)


def test_gae_hand_case():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma 1, lambda 0.95:
    # d2 = 1 - 0.7 = 0.3; d1 = 0.7 - 0.6 = 0.1; d0 = 0.6 - 0.5 = 0.1
    # A2 = 0.3; A1 = 0.1 + 0.95 * 0.3 = 0.385; A0 = 0.1 + 0.95 * 0.385 = 0.46575
    adv, ret = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[True, True, True]]), 1.0, 0.95)
    torch.testing.assert_close(adv, T([[0.46575, 0.385, 0.3]]))
    torch.testing.assert_close(ret, T([[0.96575, 0.985, 1.0]]))


def test_gae_padding_is_terminal_and_ignored():
    # gamma 0.9, lambda 0.8, row [1, 2 | pad 99], V [1, 1 | 99]:
    # d1 = 2 - 1 = 1 (terminal after it); A1 = 1; d0 = 1 + 0.9 * 1 - 1 = 0.9; A0 = 0.9 + 0.72 * 1 = 1.62
    adv, ret = gae(T([[1.0, 2.0, 99.0]]), T([[1.0, 1.0, 99.0]]), T([[True, True, False]]), 0.9, 0.8)
    torch.testing.assert_close(adv, T([[1.62, 1.0, 0.0]]))
    torch.testing.assert_close(ret, T([[2.62, 2.0, 0.0]]))


def test_returns_to_go():
    g = returns_to_go(T([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]]), T([[1, 1, 1], [1, 0, 0]]).bool(), gamma=0.5)
    torch.testing.assert_close(g, T([[1.5, 1.0, 2.0], [3.0, 0.0, 0.0]]))


def test_ppo_loss_hand_case():
    # ratio = [1.5, 0.5, 1.0], A = [1, 1, -1], eps 0.2:
    # t0: max(-1.5, -1.2) = -1.2 (clipped); t1: max(-0.5, -0.8) = -0.5; t2: max(1, 1) = 1
    old = T([0.0, 0.0, 0.0])
    logp = torch.log(T([1.5, 0.5, 1.0]))
    # value: v = [1, 2, 0], old_v = [0.5, 2, 0.5], R = [2, 1, 0], clip 0.2:
    # t0: (1-2)^2 = 1 vs (0.7-2)^2 = 1.69 -> 1.69; t1: 1 vs 1 -> 1; t2: 0 vs 0.3^2 = 0.09 -> 0.09
    actor, critic, stats = ppo_loss(logp, old, T([1.0, 1.0, -1.0]), T([True, True, True]), clip_eps=0.2,
                                    values=T([1.0, 2.0, 0.0]), old_values=T([0.5, 2.0, 0.5]),
                                    returns=T([2.0, 1.0, 0.0]), value_clip=0.2)
    assert float(actor) == pytest.approx((-1.2 - 0.5 + 1.0) / 3)
    assert float(stats["clip_frac"]) == pytest.approx(1 / 3)
    assert float(critic) == pytest.approx(0.5 * (1.69 + 1.0 + 0.09) / 3)
    assert float(stats["value_clip_frac"]) == pytest.approx(2 / 3)
    # approx_kl: k3 of KL(pi_old || pi) from samples of pi_old, exp(x) - 1 - x with x = log ratio:
    # [1.5 - 1 - ln 1.5, 0.5 - 1 + ln 2, 0] = [0.0945349, 0.1931472, 0]
    assert float(stats["approx_kl"]) == pytest.approx((0.0945349 + 0.1931472) / 3, rel=1e-5)


def test_approx_kl_estimates_kl_old_to_new():
    """Monte Carlo: tokens drawn from pi_old; the mean of approx_kl tends to KL(pi_old || pi_new)."""
    p_old, p_new = T([0.7, 0.2, 0.1], dtype=torch.float64), T([0.2, 0.3, 0.5], dtype=torch.float64)
    exact = float((p_old * (p_old / p_new).log()).sum())  # 0.634897
    r = p_new / p_old
    k3 = r - 1 - r.log()  # the estimator at each token: [0.538477, 0.094535, 2.390562]
    sd = math.sqrt(float((p_old * k3**2).sum()) - exact**2)  # its exact standard deviation under pi_old: 0.610853
    n = 100_000
    tol = 5 * sd / math.sqrt(n)  # 5 standard errors: 0.00966 (a false failure has probability ~6e-7)
    # what the test tells apart: KL(pi_new || pi_old) = 0.675806, and the mean of exp(-x) - 1 + x (the k3
    # of the other direction evaluated on samples of pi_old) = 0.968436
    for wrong in (float((p_new * r.log()).sum()), float((p_old * (1 / r - 1 + r.log())).sum())):
        assert abs(wrong - exact) > 4 * tol
    tokens = torch.multinomial(p_old, n, replacement=True, generator=torch.Generator().manual_seed(0))
    _, _, stats = ppo_loss(p_new.log()[tokens].float(), p_old.log()[tokens].float(), torch.zeros(n),
                           torch.ones(n, dtype=torch.bool))
    assert float(stats["approx_kl"]) == pytest.approx(exact, abs=tol)


def test_ppo_loss_gradient_is_zero_where_clipped():
    logp = torch.log(T([1.5, 0.5])).requires_grad_()
    actor, _, _ = ppo_loss(logp, T([0.0, 0.0]), T([1.0, 1.0]), T([True, True]), clip_eps=0.2)
    actor.backward()
    # d/dlogp of -A * ratio / n = -ratio / 2 where unclipped; 0 where the clip is active
    torch.testing.assert_close(logp.grad, T([0.0, -0.25]))


@pytest.mark.parametrize("impl", IMPLS)
def test_value_clip_counts_only_values_that_moved_beyond_the_clip(impl):
    # clip 0.2; v = [0.01, -0.06, 1], old_v = [-0.06, 0.08, 0.5], R = [0, 0, 2]:
    #   t0, t1 moved 0.07 and 0.14 < 0.2: v_clip = v, error v^2 = 1e-4 and 3.6e-3, not clipped
    #   t2 moved 0.5: v_clip = 0.7, (0.7 - 2)^2 = 1.69 > (1 - 2)^2 = 1: clipped, no slope
    # (the formula old + clamp(v - old) rounds t0 and t1 away from v, 0.01 + 1.9e-9 and -0.06 - 3.7e-9, and the
    # max then took the rounded value: value_clip_frac 1, not 1/3)
    v = T([0.01, -0.06, 1.0], requires_grad=True)
    old_v, ret = T([-0.06, 0.08, 0.5]), T([0.0, 0.0, 2.0])
    rounded = old_v[:2] + (v[:2].detach() - old_v[:2]).clamp(-0.2, 0.2)
    assert (rounded != v[:2].detach()).all() and ((rounded - ret[:2]) ** 2 > v[:2].detach() ** 2).all()
    loss, stats = value_loss(v, old_v, ret, T([True, True, True]), impl=impl, value_clip=0.2)
    loss.backward()
    assert float(stats["value_clip_frac"]) == pytest.approx(1 / 3, abs=1e-7)
    assert float(loss.detach()) == pytest.approx(0.5 * (1e-4 + 3.6e-3 + 1.69) / 3, rel=1e-6)
    # d/dv of 0.5 (v - R)^2 / 3 = (v - R) / 3 where unclipped; 0 where the clipped branch wins
    torch.testing.assert_close(v.grad, T([0.01 / 3, -0.06 / 3, 0.0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_value_clip_never_counts_a_value_inside_the_band(impl):
    """Every token moved less than the clip (|v - old_v| < 0.2 - 1e-6 in fp64): nothing is clipped, the loss is
    the plain squared error and the gradient (v - R) / n. On the same data the formula old + clamp(v - old)
    counted tokens as clipped (asserted, so the case can tell the two apart)."""
    g = torch.Generator().manual_seed(0)
    N, c = 20000, 0.2
    v = torch.randn(N, generator=g)
    old_v = v + (torch.rand(N, generator=g) * 2 - 1) * (c - 1e-6)
    old_v = torch.where((v.double() - old_v.double()).abs() < c - 1e-6, old_v, v)  # fp32 rounding at the edge
    ret = torch.randn(N, generator=g)
    rounded = old_v + (v - old_v).clamp(-c, c)
    assert int(((rounded - ret) ** 2 > (v - ret) ** 2).sum()) > 10  # measured: 54 of 20000
    leaf = v.clone().requires_grad_()
    loss, stats = value_loss(leaf, old_v, ret, torch.ones(N, dtype=torch.bool), impl=impl, value_clip=c)
    loss.backward()
    assert float(stats["value_clip_frac"]) == 0.0
    assert float(loss.detach()) == pytest.approx(float(0.5 * ((v.double() - ret.double()) ** 2).mean()), rel=1e-5)
    torch.testing.assert_close(leaf.grad, (v - ret) / N, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_ppo_loss_stays_finite_at_extreme_log_ratios(impl):
    # log ratio x = [100, ln 0.5, -100, ln 4], A = [-1, 1, 1, -1], eps 0.2; x is clamped to +-20:
    #   t0: ratio e^20, A < 0: max(e^20, 1.2) = e^20 (finite; x beyond the bound: no slope)
    #   t1: ratio 0.5, A > 0: max(-0.5, -0.8) = -0.5, slope -A r / 4 = -0.125
    #   t2: ratio e^-20, A > 0: max(-e^-20, -0.8) = -e^-20 (beyond the bound: no slope)
    #   t3: ratio 4, A < 0: max(4, 1.2) = 4, slope -A r / 4 = 1
    # unclamped, t0 gave exp(100) = inf in fp32: an inf loss (and approx_kl), the step skipped
    e20 = math.exp(20.0)
    x = T([100.0, math.log(0.5), -100.0, math.log(4.0)])
    adv = T([-1.0, 1.0, 1.0, -1.0])
    logp = (x - 1.0).requires_grad_()
    actor, _, stats = ppo_loss(logp, torch.full((4,), -1.0), adv, T([True] * 4), impl=impl, clip_eps=0.2)
    actor.backward()
    assert math.isfinite(actor.item()) and math.isfinite(float(stats["approx_kl"]))
    assert actor.item() == pytest.approx((e20 - 0.5 - math.exp(-20.0) + 4.0) / 4, rel=1e-6)
    torch.testing.assert_close(logp.grad, T([0.0, -0.125, 0.0, 1.0]), rtol=1e-6, atol=0)
    # approx_kl of the clamped x: (e^20 - 1 - 20) + (0.5 - 1 + ln 2) + (e^-20 - 1 + 20) + (4 - 1 - ln 4)
    kl = (e20 - 21.0) + (math.log(2.0) - 0.5) + (math.exp(-20.0) + 19.0) + (3.0 - math.log(4.0))
    assert float(stats["approx_kl"]) == pytest.approx(kl / 4, rel=1e-6)
    # dual clip 3: t0's loss becomes 3 |A| = 3 and t3's 3 (4 > 3), both without slope
    logp.grad = None
    actor, _, stats = ppo_loss(logp, torch.full((4,), -1.0), adv, T([True] * 4), impl=impl, clip_eps=0.2,
                               dual_clip=3.0)
    actor.backward()
    assert actor.item() == pytest.approx((3.0 - 0.5 - math.exp(-20.0) + 3.0) / 4, rel=1e-6)
    assert float(stats["dual_clip_frac"]) == pytest.approx(0.5)
    torch.testing.assert_close(logp.grad, T([0.0, -0.125, 0.0, 0.0]), rtol=1e-6, atol=0)


def _unclamped_policy_loss(logp, old_logp, adv, m, eps):
    """The policy loss as written before the log-ratio bound (the textbook formula), for the bit-for-bit check."""
    log_ratio = (logp - old_logp) * m
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1.0 - eps, 1.0 + eps)
    loss = (torch.maximum(unclipped, clipped) * m).sum() / m.sum()
    return loss, (torch.expm1(log_ratio) - log_ratio).mul(m).sum() / m.sum()


def test_log_ratio_bound_changes_nothing_inside_it():
    # |x| <= 20, including exactly +-20: loss, approx_kl and gradient are bit for bit the unclamped formula's
    g = torch.Generator().manual_seed(1)
    N = 4099
    x = torch.cat([T([20.0, -20.0, 19.999998, 0.0]), (torch.rand(N - 4, generator=g) * 2 - 1) * 20])
    old, adv = torch.randn(N, generator=g), torch.randn(N, generator=g)
    mask = torch.rand(N, generator=g) > 0.1
    assert ((old + x) - old).abs().max() <= 20.0
    a, b = (old + x).requires_grad_(), (old + x).requires_grad_()
    actor, _, stats = ppo_loss(a, old, adv, mask, impl="torch", clip_eps=0.2)
    actor.backward()
    loss, approx_kl = _unclamped_policy_loss(b, old, adv, mask.float(), 0.2)
    loss.backward()
    assert torch.equal(actor.detach(), loss.detach()) and torch.equal(stats["approx_kl"], approx_kl.detach())
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_dual_clip_hand_case(impl):
    # ratio r = [4, 1.5, 0.5, 4, 10], A = [-1, -2, -1, 1, -0.5], eps 0.2, dual_clip 3; per token
    # max(-A r, -A clip(r)), then min(that, 3 |A|) where A < 0:
    #   t0: max(4, 1.2) = 4 -> min(4, 3) = 3      dual clip binds: no slope
    #   t1: max(3, 2.4) = 3 -> min(3, 6) = 3      slope -A r = 3
    #   t2: max(0.5, 0.8) = 0.8 -> 0.8            clipped: no slope
    #   t3: max(-4, -1.2) = -1.2 (A > 0: no dual clip; clipped, no slope)
    #   t4: max(5, 0.6) = 5 -> min(5, 1.5) = 1.5  dual clip binds
    # loss (3 + 3 + 0.8 - 1.2 + 1.5) / 5 = 1.42; clip_frac 2/5 (t2, t3); dual_clip_frac 2/5 (t0, t4)
    # without the dual clip: (4 + 3 + 0.8 - 1.2 + 5) / 5 = 2.32, slopes [4, 3, 0, 0, 5] / 5
    r = T([4.0, 1.5, 0.5, 4.0, 10.0])
    adv = T([-1.0, -2.0, -1.0, 1.0, -0.5])
    mask = T([True] * 5)
    for dual, loss, grad in ((3.0, 1.42, [0.0, 0.6, 0.0, 0.0, 0.0]), (None, 2.32, [0.8, 0.6, 0.0, 0.0, 1.0])):
        logp = torch.log(r).requires_grad_()
        actor, _, stats = ppo_loss(logp, torch.zeros(5), adv, mask, impl=impl, clip_eps=0.2, dual_clip=dual)
        actor.backward()
        assert actor.item() == pytest.approx(loss, rel=1e-6)
        assert float(stats["clip_frac"]) == pytest.approx(0.4)
        assert ("dual_clip_frac" in stats) == (dual is not None)
        if dual is not None:
            assert float(stats["dual_clip_frac"]) == pytest.approx(0.4)
        torch.testing.assert_close(logp.grad, T(grad), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_loss(torch.log(r), torch.zeros(5), adv, mask, impl=impl, dual_clip=1.0)


def test_kl_estimators_hand_values():
    logp, ref = T([-1.0]), T([-2.0])  # log ratio 1
    assert float(kl_estimate(logp, ref, "k1")) == pytest.approx(1.0)
    assert float(kl_estimate(logp, ref, "k2")) == pytest.approx(0.5)
    assert float(kl_estimate(logp, ref, "k3")) == pytest.approx(math.exp(-1) - 1 + 1)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_coherent_reward_hand_cases():
    sft, pt = T([[-1.0, -2.0, -0.5, 0.0]]), T([[-3.0, -1.0, -0.5, 0.0]])
    mask = T([[True, True, True, False]])
    # d = [2, -1, 0]; clipped at 1.5 -> [1.5, -1, 0]; sum 0.5, length 3
    seq, final, d = coherent_rewards_ref(sft, pt, mask, granularity="sequence", token_clip=1.5)
    torch.testing.assert_close(d, T([[1.5, -1.0, 0.0, 0.0]]))
    torch.testing.assert_close(seq, T([[0.0, 0.0, 0.5, 0.0]]))
    tok, final, _ = coherent_rewards_ref(sft, pt, mask, granularity="token", token_clip=1.5)
    torch.testing.assert_close(tok, T([[1.5, -1.0, 0.0, 0.0]]))
    norm, final, _ = coherent_rewards_ref(sft, pt, mask, granularity="sequence", token_clip=1.5,
                                          length_normalize=True, scale=3.0)
    torch.testing.assert_close(norm, T([[0.0, 0.0, 0.5, 0.0]]))  # 3 * 0.5 / 3
    # no-EOS penalty as (scale 0, shift -1): the whole reward becomes -1, on the last token
    pen, final, _ = coherent_rewards_ref(sft, pt, mask, granularity="token", seq_scale=T([0.0]),
                                         seq_shift=T([-1.0]))
    torch.testing.assert_close(pen, T([[0.0, 0.0, -1.0, 0.0]]))
    # whitening-like affine and a final clip: token rewards still sum to the final sequence reward
    aff, final, _ = coherent_rewards_ref(sft, pt, mask, granularity="token", seq_scale=T([2.0]),
                                         seq_shift=T([0.5]), seq_clip=1.0)
    assert float(final) == 1.0  # 2 * 1 + 0.5 = 2.5 -> clipped to 1
    assert float(aff.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(aff[0, :2], T([4.0, -2.0]))


def test_kl_shaping_and_sequence_rewards():
    task = sequence_rewards_ref(T([2.0]), T([[True, True, False]]))
    torch.testing.assert_close(task, T([[0.0, 2.0, 0.0]]))
    shaped, kl = kl_shaped_rewards_ref(task, T([[-1.0, -1.0, 0.0]]), T([[-2.0, -1.5, 0.0]]),
                                       T([[True, True, False]]), kl_coef=0.5, kl_estimator="k1")
    torch.testing.assert_close(kl, T([[1.0, 0.5, 0.0]]))
    torch.testing.assert_close(shaped, T([[-0.5, 1.75, 0.0]]))


def test_rloo_grpo_reinforce_hand_cases():
    # two prompts x 2 samples, sequence rewards [1, 3 | 0, 2] on the last token of 1-token responses
    rewards = T([[1.0], [3.0], [0.0], [2.0]])
    mask = torch.ones_like(rewards, dtype=torch.bool)
    groups = np.array([0, 0, 1, 1])
    rloo, _ = compute_advantages("rloo", rewards, mask, prompt_index=groups, whiten=False)
    torch.testing.assert_close(rloo[:, 0], T([1 - 3, 3 - 1, 0 - 2, 2 - 0.0]))
    grpo, _ = compute_advantages("grpo", rewards, mask, prompt_index=groups, whiten=False, eps=0.0)
    s = math.sqrt(2.0)  # unbiased std of {1, 3} and of {0, 2}
    torch.testing.assert_close(grpo[:, 0], T([-1 / s, 1 / s, -1 / s, 1 / s]))
    reinforce, _ = compute_advantages("reinforce", rewards, mask, whiten=False)
    torch.testing.assert_close(reinforce[:, 0], T([1 - 1.5, 3 - 1.5, 0 - 1.5, 2 - 1.5]))
    # three samples: leave-one-out baseline of sample 0 is the mean of the other two
    r3 = T([[1.0], [2.0], [6.0]])
    loo, _ = compute_advantages("rloo", r3, torch.ones_like(r3, dtype=torch.bool), prompt_index=np.zeros(3, int),
                                whiten=False)
    torch.testing.assert_close(loo[:, 0], T([1 - 4.0, 2 - 3.5, 6 - 1.5]))


def test_grpo_tied_and_single_sample_groups_get_zero_advantage():
    # one-token responses, 5 prompts:
    #   0: the same response scored in two micro-batches, equal up to 1e-5: rounding, not a preference
    #   1: a genuine spread [1, 2, 3, 4]: mean 2.5, unbiased std sqrt(5/3) = 1.2909944
    #   2: a tie at a large magnitude, 1000 +- 0.01 (relative 1e-5)
    #   3: a small but genuine spread [0, 0.001]: std 7.0711e-4 > the 1e-4 tolerance, A = +-0.0005 / (std + eps)
    #   4: a single sample
    totals = [2.0, 2.0 + 1e-5, 2.0 - 1e-5, 2.0, 1.0, 2.0, 3.0, 4.0, 1000.0, 1000.01, 999.99, 0.0, 0.001, 5.0]
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4])
    rewards = T(totals)[:, None]
    adv, _ = compute_advantages("grpo", rewards, torch.ones_like(rewards, dtype=torch.bool), prompt_index=groups,
                                whiten=False)
    assert (adv[:4] == 0).all() and (adv[8:11] == 0).all() and adv[13, 0] == 0
    s = math.sqrt(5 / 3)
    torch.testing.assert_close(adv[4:8, 0], T([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]) / (1 + 1e-6 / s))
    torch.testing.assert_close(adv[11:13, 0], T([-0.0005, 0.0005]) / (math.sqrt(0.5) * 0.001 + 1e-6))


def test_grpo_zero_group_advantage_holds_at_every_token():
    # token rewards: the returns-to-go differ inside a response even when the totals G_0 tie, so a tied or
    # single-sample group must zero the scale, not only the numerator (G_t - mean G_0 is not 0 for t > 0)
    rewards = T([[1.0, 1.0], [1.5, 0.5], [3.0, 2.0]])  # G = [2, 1], [2, 0.5], [5, 2]
    adv = baseline_advantages("grpo", returns_to_go(rewards, torch.ones(3, 2, dtype=torch.bool)),
                              torch.ones(3, 2, dtype=torch.bool), np.array([0, 0, 1]))
    assert (adv == 0).all()
    # tie_tol=0 is plain GRPO: (G_t - mean G_0) / (std + eps) for a genuine spread
    adv = baseline_advantages("grpo", T([[2.0, 1.0], [4.0, 0.5]]), torch.ones(2, 2, dtype=torch.bool),
                              np.array([0, 0]), eps=0.0, tie_tol=0.0)
    s = math.sqrt(2.0)  # std of {2, 4}; mean 3
    torch.testing.assert_close(adv, T([[-1 / s, -2 / s], [1 / s, -2.5 / s]]))


def test_whitening_default_per_estimator():
    # advantage.whiten null: true for gae and reinforce, false for rloo and grpo; an explicit value wins
    assert [resolve_whiten(e, None) for e in ("gae", "reinforce", "rloo", "grpo")] == [True, True, False, False]
    assert all(resolve_whiten(e, True) for e in ("gae", "reinforce", "rloo", "grpo"))
    assert not any(resolve_whiten(e, False) for e in ("gae", "reinforce", "rloo", "grpo"))
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        resolve_whiten("ppo", None)
    # compute_advantages follows it: grpo with a tied group keeps its zeros unless whitening is asked for
    rewards = T([[1.0], [1.0], [0.0], [2.0]])
    mask, groups = torch.ones(4, 1, dtype=torch.bool), np.array([0, 0, 1, 1])
    adv, _ = compute_advantages("grpo", rewards, mask, prompt_index=groups)
    assert (adv[:2] == 0).all() and (adv[2:] != 0).all()
    # whitened: [0, 0, -a, a] has mean 0 and biased std a / sqrt(2): [0, 0, -sqrt(2), sqrt(2)]
    adv, _ = compute_advantages("grpo", rewards, mask, prompt_index=groups, whiten=True)
    torch.testing.assert_close(adv[:, 0], T([0.0, 0.0, -math.sqrt(2.0), math.sqrt(2.0)]), rtol=1e-5, atol=0)


def test_advantage_whitening_and_explained_variance():
    adv, _ = compute_advantages("reinforce", T([[1.0, 2.0], [4.0, 0.0]]), T([[1, 1], [1, 0]]).bool())
    m = T([[1, 1], [1, 0]]).bool()
    assert float(adv[m].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(adv[m].std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)
    assert adv[1, 1] == 0
    ret = T([[1.0, 2.0, 3.0]])
    assert explained_variance(ret, ret, torch.ones(1, 3, dtype=torch.bool)) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 3) + 2.0, ret, torch.ones(1, 3, dtype=torch.bool)) == pytest.approx(0.0)


def test_running_moments_match_numpy():
    rm, seen = RunningMoments(), []
    rng = np.random.default_rng(0)
    for n in (5, 1, 17, 3):
        x = rng.normal(2.0, 3.0, n)
        rm.update(torch.as_tensor(x))
        seen.extend(x)
    assert rm.mean == pytest.approx(np.mean(seen))
    assert rm.std == pytest.approx(np.std(seen, ddof=1))
    again = RunningMoments()
    again.load_state_dict(rm.state_dict())
    assert again.std == rm.std


# ------------------------------------------------------------------------------------------------
# independent formulations, written from the textbook definitions one time step at a time


def textbook_gae(r, v, length, gamma, lam):
    adv = [0.0] * len(r)
    for t in range(length):
        total, weight = 0.0, 1.0
        for k in range(t, length):  # A_t = sum_k (gamma lam)^(k-t) delta_k
            next_v = v[k + 1] if k + 1 < length else 0.0
            total += weight * (r[k] + gamma * next_v - v[k])
            weight *= gamma * lam
        adv[t] = total
    return adv


def textbook_ppo(logp, old, adv, eps):
    terms = []
    for lp, o, a in zip(logp, old, adv):
        ratio = math.exp(lp - o)
        terms.append(-min(ratio * a, max(min(ratio, 1 + eps), 1 - eps) * a))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("seed", range(5))
def test_gae_and_ppo_against_textbook_loops(seed):
    rng = random.Random(seed)
    B, Tn = 4, 7
    lengths = [rng.randint(1, Tn) for _ in range(B)]
    r = [[rng.uniform(-2, 2) for _ in range(Tn)] for _ in range(B)]
    v = [[rng.uniform(-2, 2) for _ in range(Tn)] for _ in range(B)]
    mask = torch.tensor([[t < lengths[b] for t in range(Tn)] for b in range(B)])
    gamma, lam = rng.uniform(0.8, 1.0), rng.uniform(0.5, 1.0)
    adv, _ = gae(torch.tensor(r), torch.tensor(v), mask, gamma, lam)
    for b in range(B):
        expect = textbook_gae(r[b], v[b], lengths[b], gamma, lam)
        torch.testing.assert_close(adv[b, :lengths[b]], torch.tensor(expect[:lengths[b]]), atol=1e-5, rtol=1e-5)
    logp = [rng.uniform(-3, 0) for _ in range(20)]
    old = [x + rng.uniform(-0.5, 0.5) for x in logp]
    a = [rng.uniform(-2, 2) for _ in range(20)]
    loss, _, _ = ppo_loss(torch.tensor(logp), torch.tensor(old), torch.tensor(a), torch.ones(20, dtype=torch.bool),
                          clip_eps=0.2)
    assert float(loss) == pytest.approx(textbook_ppo(logp, old, a, 0.2), rel=1e-5)
