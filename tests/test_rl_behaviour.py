"""Behaviour of the RL trainer's wiring, with answers known independently of the code under test.

Each test fixes its inputs by hand (or constructs a situation whose outcome is obvious) and checks
what the real trainer functions (srppo_fast.stages.rl, srppo_fast.ops) make of them:

* the coherent reward log pi_SFT - log pi_PT has the right sign and size through
  `rewards_and_advantages` (sequence and token granularity, token_clip, length_normalize, scale),
  with the fused op run as the PyTorch reference and as the Triton kernel (interpreted on CPU);
* the no-EOS policy: a response without EOS gets exactly `no_eos_penalty`, the others keep theirs;
* running reward whitening (`reward.whiten`) uses the mean/std of every reward seen so far;
* advantage whitening's default (`advantage.whiten: null`): rloo and grpo are not whitened, so a prompt whose
  samples tie keeps exactly zero advantage; an explicit true whitens them;
* the KL-in-the-loss term (k2, k3) pulls the policy toward pi_ref, by the hand-computed gradient;
* end to end (score -> rewards_and_advantages -> ppo_update on tiny models): an actor trained with
  the coherent reward, or with the KL-in-loss term alone, raises the probability of the token that
  pi_SFT prefers over pi_PT.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from srppo_fast.advantages import RunningMoments
from srppo_fast.batching import microbatches
from srppo_fast.config import RLStageConfig
from srppo_fast.config_load import build
from srppo_fast.engine import TorchEngine
from srppo_fast.experience import Experience, build_sequences, forward_logits
from srppo_fast.generation import Generations
from srppo_fast.ops import ppo_loss
from srppo_fast.rl.models import score
from srppo_fast.rl.rewards import rewards_and_advantages
from srppo_fast.rl.update import ppo_update

IMPLS = ["torch", "triton"]  # triton: the kernels through TRITON_INTERPRET=1 on CPU (conftest sets it)


def T(data, **kw) -> torch.Tensor:
    """torch.tensor with float32 for numbers (the hand tables mix ints and floats)."""
    x = torch.tensor(data, **kw)
    return x.float() if not x.is_floating_point() and x.dtype != torch.bool else x


def rl_config(**sections) -> RLStageConfig:
    """An RLStageConfig with the given sections merged over the defaults; KL off unless asked for."""
    data = {"kl": {"coef": 0.0}, "advantage": {"estimator": "reinforce", "whiten": False}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return build(RLStageConfig, data, "srppo")


def hand_experience(ended=(True, True, True)) -> tuple[Experience, dict]:
    """Three responses (B=3, T=3; the third has 2 tokens, its pad entries hold garbage):

        row 0 holds pi_SFT's favourite token at t=1: sft [-1, -0.5, -2], pt [-1.5, -4, -2]  d = [0.5, 3.5, 0]
        row 1 holds pi_PT-preferred tokens:          sft [-3, -2.5, -1], pt [-1, -1.5, -1]   d = [-2, -1, 0]
        row 2 (length 2):                            sft [-2, -1],       pt [-3, -1]         d = [1, 0]
    """
    sft = T([[-1.0, -0.5, -2.0], [-3.0, -2.5, -1.0], [-2.0, -1.0, 9.0]])
    pt = T([[-1.5, -4.0, -2.0], [-1.0, -1.5, -1.0], [-3.0, -1.0, -7.0]])
    mask = T([[True, True, True], [True, True, True], [True, True, False]])
    seqs = build_sequences([[5, 6], [5, 6], [7]], [[3, 4, 2], [8, 9, 2], [3, 2]])
    old = sft.clone() * mask  # the actor is pi_SFT; KL is off in these cases anyway
    exp = Experience(seqs, mask, np.array([0, 0, 1]), T(list(ended)), old, sft * mask, None)
    return exp, {"sft": sft, "pt": pt}


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    """Run the fused coherent reward + GAE op (called by rewards_and_advantages with impl='auto') as the
    PyTorch reference and as the Triton kernel."""
    monkeypatch.setenv("SRPPO_FAST_IMPL", request.param)
    return request.param


# With token_clip = 2 and scale = 2:  clipped d = [0.5, 2, 0], [-2, -1, 0], [1, 0]  (sums 2.5, -3, 1)
#   R                    = 2 * [2.5, -3, 1]                = [5, -6, 2]
#   R (length_normalize) = 2 * [2.5 / 3, -3 / 3, 1 / 2]    = [5/3, -2, 1]
HAND = {
    # (granularity, length_normalize): shaped rewards [B, T]
    ("sequence", False): [[0, 0, 5], [0, 0, -6], [0, 2, 0]],
    ("token", False): [[1, 4, 0], [-4, -2, 0], [2, 0, 0]],  # 2 * d_t
    ("sequence", True): [[0, 0, 5 / 3], [0, 0, -2], [0, 1, 0]],
    ("token", True): [[1 / 3, 4 / 3, 0], [-4 / 3, -2 / 3, 0], [1, 0, 0]],  # 2 * d_t / L
}
HAND_R = {False: [5.0, -6.0, 2.0], True: [5 / 3, -2.0, 1.0]}


@pytest.mark.parametrize("granularity", ["sequence", "token"])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_coherent_reward_sign_and_size_by_hand(impl, granularity, length_normalize):
    rl = rl_config(reward={"granularity": granularity, "scale": 2.0, "token_clip": 2.0,
                           "length_normalize": length_normalize})
    exp, scores = hand_experience()
    stats = rewards_and_advantages(rl, exp, scores, RunningMoments())
    R = HAND_R[length_normalize]
    torch.testing.assert_close(exp.rewards, T(HAND[granularity, length_normalize]))
    # the response with pi_SFT's favourite token is rewarded, the pi_PT-preferred one penalised
    assert exp.rewards[0].sum() > 0 > exp.rewards[1].sum()
    # returns-to-go (gamma 1) and REINFORCE advantages G_t - mean_b G_0, known from R
    G0 = T(R)
    torch.testing.assert_close(exp.returns[:, 0], G0)
    torch.testing.assert_close(exp.advantages[:, 0], G0 - G0.mean())
    assert exp.advantages[0, 0] > 0 > exp.advantages[1, 0]
    # the logged reward and per-token log-ratio: valid clipped d = 0.5, 2, 0, -2, -1, 0, 1, 0
    assert stats["reward/coherent"] == pytest.approx(sum(R) / 3, abs=1e-6)
    assert stats["reward/task"] == pytest.approx(sum(R) / 3, abs=1e-6)
    assert stats["log_ratio/mean"] == pytest.approx(0.5 / 8, abs=1e-6)
    assert stats["log_ratio/p95"] > 1.0 and stats["log_ratio/p05"] < -1.0


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_no_eos_penalty_replaces_the_reward_of_unfinished_responses(impl, granularity):
    exp, scores = hand_experience(ended=(True, True, False))
    rl = rl_config(reward={"granularity": granularity, "scale": 2.0, "token_clip": 2.0, "no_eos": "penalty",
                           "no_eos_penalty": -0.75})
    stats = rewards_and_advantages(rl, exp, scores, RunningMoments())
    # rows 0 and 1 ended with EOS: their coherent reward (R = 5, -6) is untouched; row 2 did not:
    # its whole reward is the penalty, on its last token (token granularity too: no per-token part)
    torch.testing.assert_close(exp.rewards[:2], T(HAND[granularity, False][:2]))
    torch.testing.assert_close(exp.rewards[2], T([0.0, -0.75, 0.0]))
    torch.testing.assert_close(exp.returns[:, 0], T([5.0, -6.0, -0.75]))
    assert stats["reward/task"] == pytest.approx((5.0 - 6.0 - 0.75) / 3, abs=1e-6)
    # no_eos=keep: the unfinished response is scored like the others
    exp, scores = hand_experience(ended=(True, True, False))
    rewards_and_advantages(rl_config(reward={"granularity": granularity, "scale": 2.0, "token_clip": 2.0,
                                             "no_eos": "keep", "no_eos_penalty": -0.75}),
                           exp, scores, RunningMoments())
    torch.testing.assert_close(exp.rewards, T(HAND[granularity, False]))


def test_no_eos_penalty_is_exact_under_whitening_too():
    exp, scores = hand_experience(ended=(False, True, True))
    rl = rl_config(reward={"scale": 2.0, "token_clip": 2.0, "whiten": True, "no_eos": "penalty",
                           "no_eos_penalty": -0.75})
    rewards_and_advantages(rl, exp, scores, RunningMoments())
    R = np.array(HAND_R[False])
    mean, std = R.mean(), R.std(ddof=1)  # the running moments have seen this buffer only
    torch.testing.assert_close(exp.returns[:, 0], T([-0.75, (R[1] - mean) / std, (R[2] - mean) / std]).float())


def random_buffer(rng: np.random.Generator, B: int, T_max: int, bias: float):
    """Random log-probs whose log-ratio has mean `bias` per token; ragged response lengths."""
    lengths = rng.integers(1, T_max + 1, B)
    mask = torch.as_tensor(np.arange(T_max)[None, :] < lengths[:, None])
    pt = torch.as_tensor(rng.uniform(-4, -0.1, (B, T_max)), dtype=torch.float32)
    sft = pt + torch.as_tensor(rng.normal(bias, 1.0, (B, T_max)), dtype=torch.float32)
    sft[~mask], pt[~mask] = 5.0, -5.0  # garbage off the mask
    responses = [[3] * int(n) for n in lengths]
    exp = Experience(build_sequences([[4]] * B, responses), mask, np.arange(B), torch.ones(B, dtype=torch.bool),
                     sft.clone(), sft.clone(), None)
    # the raw sequence reward before `scale`, computed here in float64: the sum of the valid log-ratios
    raw = np.array([float((sft[b, :n].double() - pt[b, :n].double()).sum()) for b, n in enumerate(lengths)])
    return exp, {"sft": sft, "pt": pt}, raw, lengths


def sequence_rewards(exp: Experience, lengths) -> np.ndarray:
    """R' of each response: its reward on its last token (sequence granularity, no KL)."""
    return np.array([float(exp.rewards[b, n - 1]) for b, n in enumerate(lengths)])


def test_reward_whitening_uses_the_moments_of_everything_seen(impl):
    rng = np.random.default_rng(0)
    rl = rl_config(reward={"whiten": True, "scale": 1.5})
    moments, seen = RunningMoments(), []
    for B, bias in ((16, 0.4), (3, -1.0), (40, 0.9), (1, 2.0)):
        exp, scores, raw, lengths = random_buffer(rng, B, 6, bias)
        stats = rewards_and_advantages(rl, exp, scores, moments)
        seen.extend(1.5 * raw)
        mean, std = np.mean(seen), np.std(seen, ddof=1)
        assert moments.count == len(seen)
        assert moments.mean == pytest.approx(mean, rel=1e-6, abs=1e-6)
        assert moments.std == pytest.approx(std, rel=1e-6)
        np.testing.assert_allclose(sequence_rewards(exp, lengths), (1.5 * raw - mean) / std, rtol=1e-5, atol=1e-5)
        assert stats["reward/coherent"] == pytest.approx(np.mean(1.5 * raw), rel=1e-5, abs=1e-5)  # before whitening
        assert stats["reward/task"] == pytest.approx(np.mean((1.5 * raw - mean) / std), rel=1e-5, abs=1e-5)


def test_reward_whitening_of_one_large_buffer_has_mean_0_std_1(impl):
    B = 512 if impl == "torch" else 96  # the interpreted kernel runs one program per row: keep it quick
    exp, scores, raw, lengths = random_buffer(np.random.default_rng(1), B, 8, 0.7)
    assert raw.mean() > 1.0  # far from 0: whitening has real work to do
    rewards_and_advantages(rl_config(reward={"whiten": True, "scale": 3.0}), exp, scores, RunningMoments())
    final = sequence_rewards(exp, lengths)
    assert final.mean() == pytest.approx(0.0, abs=1e-5)
    assert final.std(ddof=1) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(final, (raw - raw.mean()) / raw.std(ddof=1), rtol=1e-4, atol=1e-4)
    # whitening keeps the order of the responses (it is an increasing affine map)
    assert np.array_equal(np.argsort(final, kind="stable"), np.argsort(raw, kind="stable"))


# ------------------------------------------------------------------------------------------------
# advantage whitening: null (the default) leaves rloo and grpo alone, so a tied group keeps zero advantage


def tie_experience() -> tuple[Experience, dict]:
    """Five responses to two prompts (T=2), d = log pi_SFT - log pi_PT per token, sequence reward R = sum d:

        prompt 0, rows 0-2: d = [0.5, 0.5], [1, 0], [0.25, 0.75]   R = 1, 1, 1 (a tie, in different tokens)
        prompt 1, row 3:    d = [1, 2]                              R = 3
        prompt 1, row 4:    d = [1] (one token; pad entry garbage)  R = 1
    The d are dyadic, so every sum is exact in both implementations.
    """
    d = T([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75], [1.0, 2.0], [1.0, 9.0]])
    mask = T([[True, True]] * 4 + [[True, False]])
    pt = torch.full_like(d, -3.0)
    sft = pt + d
    seqs = build_sequences([[5, 6]] * 3 + [[7]] * 2, [[3, 4], [8, 4], [9, 2], [3, 4], [3]])
    exp = Experience(seqs, mask, np.array([0, 0, 0, 1, 1]), torch.ones(5, dtype=torch.bool), sft * mask,
                     sft * mask, None)
    return exp, {"sft": sft, "pt": pt}


# By hand, gamma 1, the reward on each response's last token, so G_t = R at every token:
#   rloo: prompt 0: R - mean of the other two = 0; row 3: 3 - 1 = 2; row 4: 1 - 3 = -2
#   grpo: prompt 0 tied: 0; prompt 1: mean 2, unbiased std sqrt(2): +-1 / (sqrt(2) + 1e-6)
# Whitened (advantage.whiten=true), over the 9 tokens [0 x 6, a, a, -a]: mean a/9, variance 26 a^2 / 81, so
# prompt 0 -> -1/sqrt(26), row 3 -> 8/sqrt(26), row 4 -> -10/sqrt(26), for rloo (a = 2) and grpo alike.
A_GRPO = 1.0 / (math.sqrt(2.0) + 1e-6)
TIE_HAND = {"rloo": [[0, 0]] * 3 + [[2, 2], [-2, 0]], "grpo": [[0, 0]] * 3 + [[A_GRPO, A_GRPO], [-A_GRPO, 0]]}
TIE_WHITENED = [[-1, -1]] * 3 + [[8, 8], [-10, 0]]  # x 1/sqrt(26)


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
@pytest.mark.parametrize("reward", ["coherent", "model"])
def test_tied_group_keeps_zero_advantage_under_the_default_whitening(impl, estimator, reward):
    # the stage config as a user gets it: advantage.whiten not given (null)
    rl = build(RLStageConfig, {"kl": {"coef": 0.0}, "advantage": {"estimator": estimator}}, "srppo")
    assert rl.advantage.whiten is None
    exp, scores = tie_experience()
    if reward == "model":  # one score per response, the same totals: compute_advantages' path
        scores = {"model": T([1.0, 1.0, 1.0, 3.0, 1.0])}
    rewards_and_advantages(rl, exp, scores, RunningMoments())
    assert (exp.advantages[:3] == 0).all()  # exactly: the tie rule survives
    torch.testing.assert_close(exp.advantages, T(TIE_HAND[estimator]), rtol=1e-6, atol=0)
    # an explicit true still whitens: the tied group moves to -mean / std
    rl = build(RLStageConfig, {"kl": {"coef": 0.0}, "advantage": {"estimator": estimator, "whiten": True}},
               "srppo")
    exp, _ = tie_experience()
    rewards_and_advantages(rl, exp, scores, RunningMoments())
    torch.testing.assert_close(exp.advantages, T(TIE_WHITENED) / math.sqrt(26.0), rtol=1e-5, atol=0)
    valid = exp.advantages[exp.mask].double()
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(valid.std(unbiased=False)) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("reward", ["coherent", "model"])
def test_reinforce_is_whitened_under_the_default(impl, reward):
    # reinforce, whiten null: G_0 = [1, 1, 1, 3, 1], baseline 7/5, so A = G_t - 1.4 on the 9 tokens is -0.4 x 7
    # and 1.6 x 2: mean 2/45, centred -4/9 and 14/9, biased variance (7 * 16 + 2 * 196) / 729 = 56/81, so the
    # whitened advantages are -4/sqrt(56) and 14/sqrt(56)
    rl = build(RLStageConfig, {"kl": {"coef": 0.0}, "advantage": {"estimator": "reinforce"}}, "srppo")
    exp, scores = tie_experience()
    if reward == "model":
        scores = {"model": T([1.0, 1.0, 1.0, 3.0, 1.0])}
    rewards_and_advantages(rl, exp, scores, RunningMoments())
    torch.testing.assert_close(exp.advantages, T([[-4, -4]] * 3 + [[14, 14], [-4, 0]]) / math.sqrt(56.0), rtol=1e-5,
                               atol=0)


@pytest.mark.parametrize("estimator", ["gae", "reinforce", "rloo", "grpo"])
def test_a_reward_model_and_the_coherent_reward_with_the_same_scores_give_the_same_advantages(impl, estimator):
    """One reward-to-advantage path: a reward model whose score of each response is the coherent reward's R gives
    the same per-token rewards, returns and advantages, through the same adjustments (no-EOS penalty, running
    whitening, clipping), KL shaping, GAE or baseline and whitening."""
    rng = np.random.default_rng(7)
    B, T_max = 12, 6
    exp, scores, raw, lengths = random_buffer(rng, B, T_max, bias=0.3)
    exp.prompt_index = np.repeat(np.arange(B // 3), 3)
    exp.ended = torch.as_tensor(rng.random(B) < 0.75)  # a quarter without EOS: the penalty replaces their reward
    exp.ref_logp = exp.old_logp + torch.as_tensor(rng.normal(0, 0.1, (B, T_max)), dtype=torch.float32) * exp.mask
    if estimator == "gae":
        exp.values = torch.as_tensor(rng.normal(0, 1, (B, T_max)), dtype=torch.float32) * exp.mask
    sections = {"kl": {"coef": 0.1, "estimator": "k1"}, "advantage": {"estimator": estimator, "whiten": None},
                "reward": {"whiten": True, "clip": 2.0, "no_eos": "penalty", "no_eos_penalty": -0.5}}
    coherent = build(RLStageConfig, sections, "srppo")
    model = build(RLStageConfig, {**sections, "reward": {**sections["reward"], "type": "model",
                                                         "model_path": "rm/"}}, "ppo_rm")
    runs = {}
    for name, rl, given in (("coherent", coherent, scores), ("model", model, {"model": torch.as_tensor(raw).float()})):
        e = dataclasses.replace(exp, stats={})
        stats = rewards_and_advantages(rl, e, given, RunningMoments())
        runs[name] = (e, stats)
    (a, sa), (b, sb) = runs["coherent"], runs["model"]
    assert (a.rewards[~a.mask] == 0).all() and (b.rewards[~b.mask] == 0).all()
    for field in ("rewards", "returns", "advantages"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-5)
    assert sa["reward/task"] == pytest.approx(sb["reward/task"], abs=1e-5)
    assert sa["reward/coherent"] == pytest.approx(sb["reward/model"], abs=1e-5)


# ------------------------------------------------------------------------------------------------
# the KL term in the loss (k2, k3; k1's gradient does not depend on pi_ref)


@pytest.mark.parametrize("loss_impl", IMPLS)
def test_kl_in_loss_hand_case(loss_impl):
    # two tokens: log pi - log pi_ref = x = +1 (above the reference) and -1 (below); A = 0 and pi_old = pi,
    # so only the KL term acts. kl_coef 0.5, token mean over 2 tokens:
    #   k2 = x^2 / 2:          loss 0.5 * (0.5 + 0.5) / 2 = 0.25;  dloss/dlogp = 0.5 * x / 2 = [0.25, -0.25]
    #   k3 = e^-x - 1 + x:     loss 0.5 * ((e^-1) + (e - 2)) / 2;  dloss/dlogp = 0.5 * (1 - e^-x) / 2
    e = math.e
    expect = {"k2": (0.25, [0.25, -0.25]),
              "k3": (0.25 * (1 / e + e - 2), [0.25 * (1 - 1 / e), 0.25 * (1 - e)])}
    for estimator, (loss_value, grad_value) in expect.items():
        logp = T([-1.0, -3.0], requires_grad=True)
        ref = T([-2.0, -2.0])
        actor, _, stats = ppo_loss(logp, logp.detach(), T([0.0, 0.0]), T([True, True]), ref_logp=ref, kl_coef=0.5,
                                   kl_estimator=estimator, impl=loss_impl)
        assert float(actor.detach()) == pytest.approx(loss_value, rel=1e-5)
        assert float(stats["kl_loss"]) == pytest.approx(loss_value / 0.5, rel=1e-5)
        actor.backward()
        torch.testing.assert_close(logp.grad, T(grad_value))
        # descent lowers log pi where it is above pi_ref and raises it where it is below
        assert logp.grad[0] > 0 > logp.grad[1]


@pytest.mark.parametrize("loss_impl", IMPLS)
@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_in_loss_pulls_a_categorical_policy_to_the_reference(loss_impl, estimator):
    """A free logits vector, trained on the KL term alone. The expected gradient over samples y ~ pi is
    sum_y pi(y) g(y) grad log pi(y), with g(y) = dloss/dlogp(y) from ppo_loss (one token per y): for k2 that
    is the gradient of KL(pi || ref), for k3 of KL(ref || pi); either decreases at every step."""
    q = torch.softmax(T([2.0, 0.5, -1.0, 0.0, 1.0, -2.0]), 0)  # the reference
    logits = T([-1.0, 1.0, 2.0, 0.0, -2.0, 1.0], requires_grad=True)
    log_q, V = q.log(), len(q)

    def kl(p, r):
        return float((p * (p.log() - r.log())).sum())

    distances = []
    for _ in range(30):
        logp = torch.log_softmax(logits, 0)
        p = logp.exp().detach()
        distances.append(kl(p, q) if estimator == "k2" else kl(q, p))
        x = logp.detach().requires_grad_()
        loss, _, _ = ppo_loss(x, x.detach(), torch.zeros(V), torch.ones(V, dtype=torch.bool), ref_logp=log_q,
                              kl_coef=1.0, kl_estimator=estimator, normalizer=1.0, impl=loss_impl)
        (g,) = torch.autograd.grad(loss, x)
        (grad,) = torch.autograd.grad((p * g * logp).sum(), logits)
        with torch.no_grad():
            logits -= 1.0 * grad
    assert all(b < a for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] < 0.1 * distances[0]


# ------------------------------------------------------------------------------------------------
# end to end: score -> rewards_and_advantages -> ppo_update on tiny models

VOCAB, X, EOS = 24, 7, 2  # X: the token pi_SFT likes more than pi_PT does
ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
        "tie_word_embeddings": True}


class _VocabOnly:
    """What build_scratch_model reads from a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, EOS, 0

    def __len__(self):
        return VOCAB


def tiny_pair():
    """(pi_PT, pi_SFT): pi_SFT is pi_PT with +3 on token X's logit everywhere (an output bias)."""
    from srppo_fast.config import ModelConfig
    from srppo_fast.modeling import build_scratch_model

    pt = build_scratch_model(ModelConfig(base="scratch", tokenizer="world", arch=dict(ARCH)), _VocabOnly(), seed=0)
    sft = copy.deepcopy(pt)
    head = torch.nn.Linear(ARCH["hidden_size"], VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(pt.get_output_embeddings().weight)
        head.bias.zero_()
        head.bias[X] = 3.0
    sft.lm_head = head  # untied in the copy only; pi_PT's embeddings stay as they were
    for m in (pt, sft):
        m.eval().requires_grad_(False)
    return pt, sft


def fixed_rollout(n_prompts: int = 8):
    """Two responses per prompt, both ending in EOS: one holds X, its twin the same tokens with X replaced."""
    rng = np.random.default_rng(0)
    ordinary = [t for t in range(3, VOCAB) if t != X]
    prompts, responses = [], []
    for _ in range(n_prompts):
        prompt = [int(t) for t in rng.choice(ordinary, 3)]
        a, b, c = (int(t) for t in rng.choice(ordinary, 3))
        for middle in (X, c):
            prompts.append(prompt)
            responses.append([a, middle, b, EOS])
    gens = Generations(responses, [True] * len(responses), list(range(len(responses))))
    return prompts, gens


@torch.no_grad()
def response_distributions(model, prompts, responses) -> torch.Tensor:
    """[n response tokens, V] log pi(. | context) at every response position of the rollout."""
    seqs = build_sequences(prompts, responses)
    out = []
    for batch in microbatches(seqs, np.arange(len(seqs)), 4096):
        logits = forward_logits(model, batch)[batch.labels[0] != -100]
        out.append(torch.log_softmax(logits.float(), -1))
    return torch.cat(out)


def train_actor(rl: RLStageConfig, steps: int = 3) -> tuple[torch.Tensor, torch.Tensor, dict, list]:
    """The actor starts as pi_PT; each step scores the fixed rollout with the real `score`, then runs
    `rewards_and_advantages` and `ppo_update`. Returns the actor's log pi(. | context) before and after
    over the response positions, pi_SFT's, and the per-step stats."""
    torch.manual_seed(0)
    np.random.seed(0)
    pt, sft = tiny_pair()
    actor = TorchEngine(copy.deepcopy(pt).requires_grad_(True), rl.optim, steps, torch.device("cpu"))
    models = SimpleNamespace(rl=rl, ctx=SimpleNamespace(device=torch.device("cpu")), actor=actor, critic=None,
                             ref=sft, sft=sft, pt=pt, reward_model=None)
    prompts, gens = fixed_rollout()
    before = response_distributions(actor.model, prompts, gens.responses)
    history, moments = [], RunningMoments()
    for _ in range(steps):
        exp, scores = score(models, prompts, gens, rl.ppo.micro_batch_tokens)
        stats = rewards_and_advantages(rl, exp, scores, moments)
        stats.update(ppo_update(models, exp, train_actor=True))
        history.append((exp, stats))
    after = response_distributions(actor.model, prompts, gens.responses)
    return before, after, response_distributions(sft, prompts, gens.responses), history


E2E_PPO = {"epochs": 2, "train_batch_size": 8, "micro_batch_tokens": 256}
E2E_OPTIM = {"lr": 1e-2, "schedule": "constant", "warmup_ratio": 0.0}


def test_coherent_reward_raises_the_actors_probability_of_the_sft_preferred_token():
    rl = rl_config(reward={"granularity": "sequence"}, ppo=E2E_PPO, optim=E2E_OPTIM,
                   advantage={"estimator": "reinforce", "whiten": True})
    before, after, _, history = train_actor(rl)
    exp, stats = history[0]
    # first buffer: every response holding X outscores its twin (X is its only difference), by about 3
    totals = exp.rewards.sum(-1)
    assert torch.all(totals[0::2] > totals[1::2] + 2.0), totals
    assert torch.all(exp.advantages[0::2][exp.mask[0::2]] > 0) and torch.all(exp.advantages[1::2][exp.mask[1::2]] < 0)
    assert stats["log_ratio/p95"] > 2.0  # the X tokens: about +3 each
    # the actor now puts more mass on X, at every response position on average and where X was sampled
    p_before, p_after = before[:, X].exp(), after[:, X].exp()
    assert p_after.mean() > 1.5 * p_before.mean(), (p_before.mean(), p_after.mean())
    # what `score` records as the actor's log-prob of the sampled X tokens went up from buffer to buffer
    first, last = history[0][0].old_logp[0::2, 1], history[-1][0].old_logp[0::2, 1]
    assert torch.all(last > first), (first, last)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_in_loss_alone_pulls_the_actor_toward_pi_ref(estimator):
    """No task reward (scale 0): the only signal is the KL term in the loss, with pi_ref = pi_SFT, which
    differs from the actor (pi_PT) only by liking X more. The actor must move toward it."""
    rl = rl_config(reward={"scale": 0.0}, kl={"coef": 1.0, "estimator": estimator, "placement": "loss"},
                   ppo=E2E_PPO, optim=E2E_OPTIM)
    before, after, ref, history = train_actor(rl)
    assert float(history[0][0].advantages.abs().max()) == 0.0  # no reward signal at all

    def kl_to_ref(logp):  # exact KL(actor || pi_ref), mean over the response positions
        return float((logp.exp() * (logp - ref)).sum(-1).mean())

    assert kl_to_ref(after) < 0.5 * kl_to_ref(before), (kl_to_ref(before), kl_to_ref(after))
    assert after[:, X].exp().mean() > 1.5 * before[:, X].exp().mean()


def test_kl_is_zero_when_the_actor_is_the_reference_at_any_temperature():
    rl = rl_config(rollout={"temperature": 0.7}, kl={"coef": 0.2, "estimator": "k3"})
    _, sft = tiny_pair()
    actor = TorchEngine(copy.deepcopy(sft).requires_grad_(True), rl.optim, 1, torch.device("cpu"))
    models = SimpleNamespace(rl=rl, ctx=SimpleNamespace(device=torch.device("cpu")), actor=actor, critic=None,
                             ref=sft, sft=sft, pt=sft, reward_model=None)
    prompts, gens = fixed_rollout(2)
    exp, scores = score(models, prompts, gens, 256)
    stats = rewards_and_advantages(rl, exp, scores, RunningMoments())
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5) and stats["reward/kl"] == pytest.approx(0.0, abs=1e-5)
    # ... while the coherent reward still reads the models themselves (temperature 1), not the tempered ref
    assert not torch.allclose(scores["sft"], exp.ref_logp)
