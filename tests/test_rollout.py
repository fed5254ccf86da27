"""The rollout pipeline's pieces that need no sampler: weight buckets, the importance correction, the
staleness bound, and the `async` key (a Python keyword) in configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srppo_fast.config import to_dict
from srppo_fast.config_load import load_config
from srppo_fast.errors import TrainingError
from srppo_fast.experience import Experience
from srppo_fast.generation import Generations
from srppo_fast.rl.rewards import sampler_correction
from srppo_fast.rl.run import RLRun
from srppo_fast.rollout.sync import bucket_plan, weight_buckets

QUICKSTART = "configs/quickstart.yaml"


def test_buckets_hold_every_parameter_once_within_the_bound(tiny_model):
    params = dict(tiny_model.named_parameters())
    assert "lm_head.weight" not in params  # tied: the embedding carries it
    for mib in (0.01, 0.05, 1000.0):
        limit = int(mib * 2**20)
        plan = bucket_plan(tiny_model, limit, torch.float32)
        names = [n for bucket in plan for n, _ in bucket]
        assert names == list(params)  # in the model's order, each once
        for bucket in plan:
            size = sum(p.numel() * 4 for _, p in bucket)
            assert size <= limit or len(bucket) == 1  # only a parameter larger than a bucket stands alone
        if mib == 1000.0:
            assert len(plan) == 1
    sent = [(n, t) for bucket in weight_buckets(tiny_model, int(0.01 * 2**20), torch.bfloat16) for n, t in bucket]
    assert [n for n, _ in sent] == list(params)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, params[n].detach().bfloat16()) for n, t in sent)


def _experience(old, sampler, adv):
    mask = torch.tensor([[True, True, True], [True, True, False]])
    exp = Experience(None, mask, np.zeros(2), torch.ones(2, dtype=torch.bool), torch.tensor(old), torch.zeros(2, 3))
    exp.sampler_logp, exp.advantages = torch.tensor(sampler), torch.tensor(adv)
    return exp


def test_truncated_importance_weights_scale_the_advantages():
    rl = load_config(QUICKSTART, ["srppo.rollout.engine=vllm", "srppo.rollout.tis_cap=1.5"], check_files=False).srppo
    old = [[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]]
    sampler = [[-1.0, -1.0, -2.5], [-0.4, -3.0, 7.0]]  # the masked-out last entry must not count
    adv = [[1.0, -2.0, 3.0], [0.5, 4.0, 9.0]]
    exp = _experience(old, sampler, adv)
    stats = sampler_correction(rl, exp)
    ratio = torch.tensor([1.0, np.exp(-1.0), np.exp(2.0), np.exp(0.2), 1.0], dtype=torch.float32)  # pi_old / pi_sampler
    weight = ratio.clamp(max=1.5)
    expected = torch.tensor([[1.0 * weight[0], -2.0 * weight[1], 3.0 * weight[2]],
                             [0.5 * weight[3], 4.0 * weight[4], 0.0]])
    assert torch.allclose(exp.advantages, expected, atol=1e-6)
    assert stats["rollout/tis_capped_frac"] == pytest.approx(1 / 5)
    assert stats["rollout/tis_weight_mean"] == pytest.approx(float(weight.mean()), rel=1e-6)
    assert stats["rollout/is_ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-6)
    assert stats["rollout/logprob_diff_max"] == pytest.approx(2.0)
    # off by default: measured, the advantages untouched
    rl_off = load_config(QUICKSTART, ["srppo.rollout.engine=vllm"], check_files=False).srppo
    exp = _experience(old, sampler, adv)
    stats = sampler_correction(rl_off, exp)
    assert torch.equal(exp.advantages, torch.tensor(adv)) and "rollout/tis_weight_mean" not in stats
    assert stats["rollout/is_ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-6)


def test_the_staleness_bound_is_enforced():
    class Run:
        staleness = RLRun.staleness

    run = Run()
    gens = Generations([[1]] * 3, [True] * 3, [0, 0, 0], versions=[4, 3, 4])
    run.rl = load_config(QUICKSTART, ["srppo.rollout.engine=vllm", "srppo.rollout.async=true",
                                      "srppo.rollout.max_staleness=1"], check_files=False).srppo
    run.version = 4
    assert run.staleness(gens, True) == {"rollout/staleness_mean": pytest.approx(1 / 3), "rollout/staleness_max": 1.0}
    run.version = 5  # a sample 2 updates old under a bound of 1: a pipeline bug, not trained on
    with pytest.raises(TrainingError, match="2 actor updates old, beyond the bound of 1"):
        run.staleness(gens, True)
    run.rl = load_config(QUICKSTART, ["srppo.rollout.engine=vllm"], check_files=False).srppo  # on-policy: 0
    run.version = 4
    with pytest.raises(TrainingError, match="beyond the bound of 0"):
        run.staleness(gens, True)
    assert run.staleness(gens, False)["rollout/staleness_max"] == 1.0  # critic warm-up: the actor does not train


def test_the_async_key_reads_and_writes_without_its_underscore():
    cfg = load_config(QUICKSTART, ["srppo.rollout.engine=vllm", "srppo.rollout.async=true"], check_files=False)
    assert cfg.srppo.rollout.async_ is True
    rollout = to_dict(cfg)["srppo"]["rollout"]
    assert rollout["async"] is True and "async_" not in rollout
    with pytest.raises(Exception, match="unknown config key 'srppo.rollout.async_'"):
        load_config(QUICKSTART, ["srppo.rollout.async_=true"], check_files=False)


def test_a_sampler_shut_down_twice_is_not_left_hung(capsys):
    """Every command's teardown shuts the process's vLLM samplers down (shutdown_all), and a process that runs
    commands twice (the library from a notebook, the test suite) tears down twice: a stopped sampler must stay
    stopped, not look hung. (It once did: the second shutdown queued a call on the stopped thread, so
    rollout.sampler_hung() held from then on and the next error ended the whole process with os._exit.)
    The sampler's own bookkeeping only: a sampler without a vLLM engine behind it."""
    from srppo_fast.cli import main
    from srppo_fast.rollout import sampler_hung
    from srppo_fast.rollout.vllm_engine import _LIVE, VLLMRolloutEngine, _CallThread, shutdown_all

    eng = object.__new__(VLLMRolloutEngine)
    eng.llm, eng.calls, eng.stopped, eng.timeout = None, _CallThread(), False, 5.0
    assert eng._call("a call", lambda: 7) == 7
    _LIVE.append(eng)
    try:
        assert eng.shutdown() is False and eng.stopped and not eng.calls.thread.is_alive()
        assert eng.shutdown() is False and not eng.busy()  # nothing is queued on the stopped thread
        assert eng in _LIVE and not sampler_hung()
        shutdown_all()
        assert eng not in _LIVE
        capsys.readouterr()
        assert main(["train", "--config", "/no/such/config.yaml"]) == 2  # an error returns; the process lives
        assert "srppo-fast: error:" in capsys.readouterr().err
    finally:
        if eng in _LIVE:
            _LIVE.remove(eng)
