"""--dry-run's per-GPU memory plan (engine/placement.py's layouts; meta-device parameter counts, no network). That
the plan's parameter bytes are what the stages really place is checked against running stages in
test_precision.py."""

import pytest

from .helpers import require

require("deepspeed")

from srppo_fast.cli import main  # noqa: E402
from srppo_fast.config_load import load_config  # noqa: E402
from srppo_fast.engine.memory import GIB, plan_memory  # noqa: E402

PAPER = "configs/paper_llama3_8b.yaml"


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_paper_config_plan_counts_llama3_8b_and_fits():
    cfg = load_config(PAPER, check_files=False)
    plans = {p.name: p for p in plan_memory(cfg, num_gpus=8, num_nodes=1, gpu_gib=80)}
    sft = plans["sft"].models[0]
    assert sft.trainable and 8.0e9 <= sft.params <= 8.1e9
    srppo = plans["srppo"]
    roles = [m.role for m in srppo.models]
    assert roles == ["actor", "critic", "frozen sft", "frozen base"]
    assert all(m.error is None for m in srppo.models)
    critic = srppo.models[1]
    assert critic.params < sft.params  # the 1-output head replaces the lm_head
    # ZeRO-3, 8 GPUs, bf16: 2 (bf16 params) + 4 (fp32 grads) + 8 (Adam) + 4 (fp32 master) bytes per param / 8
    assert sft.states == {"gradients": 4 * -(-sft.params // 8), "optimizer": 8 * -(-sft.params // 8),
                          "master weights": 4 * -(-sft.params // 8)}
    assert 18 * sft.params / 8 <= sft.gpu_bytes <= 18 * sft.params / 8 + 8 * 300  # per-parameter rounding up
    frozen = srppo.models[2]
    assert frozen.sharded and frozen.states == {}
    assert 2 * frozen.params / 8 <= frozen.gpu_bytes < 2 * frozen.params / 8 + 600
    # the update holds both trainable models' micro-batch activations; generate the HF KV cache of 64 rows
    assert srppo.transient["generate"] == 2 * 32 * 8 * 128 * 64 * (1024 + 1024) * 2
    assert srppo.transient["update"] > plans["sft"].transient["update"]
    assert srppo.total_bytes == srppo.states_bytes + max(srppo.transient.values())
    assert srppo.fits and plans["sft"].fits and plans["sft_extended"].fits
    ev = plans["eval"]  # rank 0, one whole bf16 model at a time
    assert ev.one_at_a_time and all(not m.sharded and m.gpu_bytes == 2 * m.params for m in ev.models)
    assert ev.states_bytes == max(m.gpu_bytes for m in ev.models) and ev.fits


def test_paper_config_dry_run_prints_the_plan(capsys):
    assert main(["train", "--config", PAPER, "--dry-run"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("memory plan (deepspeed ZeRO-3, 8 GPUs x 80 GiB, bf16"):]
    for stage in ("sft:", "sft_extended:", "srppo:"):
        assert f"  {stage}\n" in block
    assert "actor (trainable" in block and "critic (trainable" in block and "master weights" in block
    assert "frozen sft (" in block and "frozen base (" in block and "sharded over 8 GPUs" in block
    assert "transformers generate's KV cache" in block and "activations of a micro-batch" in block
    assert block.count(": fits") == 4 and "DOES NOT FIT" not in block
    assert "eval: (rank 0, one model at a time)" in block


def test_a_plan_that_does_not_fit_says_so(capsys):
    assert main(["train", "--config", PAPER, "--dry-run", "runtime.gpu_memory_gib=8", "deepspeed.zero_stage=2"]) == 0
    out = capsys.readouterr().out
    assert "deepspeed ZeRO-2" in out and "x 8 GiB" in out
    assert "DOES NOT FIT" in out
    assert "whole on each GPU" in out  # frozen models are not sharded below ZeRO-3


def test_the_torch_engine_on_one_gpu_is_planned(capsys):
    """One process, the torch engine: nothing sharded, bf16 parameters + fp32 masters, gradients, moments."""
    cfg = load_config(PAPER, ["runtime.engine=torch", "deepspeed.zero_stage=0"], check_files=False)
    plans = {p.name: p for p in plan_memory(cfg, num_gpus=1, num_nodes=1, gpu_gib=141)}
    sft = plans["sft"].models[0]
    assert not sft.sharded and sft.gpu_bytes == 18 * sft.params
    assert not plans["srppo"].fits  # four 8B models and two optimizers do not fit one GPU
    assert main(["train", "--config", PAPER, "--dry-run", "runtime.engine=torch", "deepspeed.zero_stage=0"]) == 0
    assert "memory plan (torch engine, one process" in capsys.readouterr().out


def test_a_hub_base_without_arch_has_unknown_size(tmp_path):
    cfg = load_config(PAPER, check_files=False)
    cfg.model.base = "example-org/not-a-cached-model"
    cfg.model.arch = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                      "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
                      "tie_word_embeddings": True}  # the default: not the base's architecture
    plans = plan_memory(cfg, num_gpus=8, num_nodes=1, gpu_gib=80)
    sft = plans[0]
    assert sft.models[0].error == "unknown size: give model.arch" and sft.fits is None


def test_a_colocated_vllm_sampler_is_planned():
    """Asleep during an on-policy update it holds nothing then; overlapping the update it holds its share."""
    require("vllm")
    base = load_config(PAPER, check_files=False)
    without = {p.name: p for p in plan_memory(base, num_gpus=8, num_nodes=1, gpu_gib=80)}["srppo"]
    for extra, held in ((["srppo.rollout.async=false"], 0), (["srppo.rollout.async=true"], int(0.25 * 80 * GIB))):
        cfg = load_config(PAPER, ["srppo.rollout.engine=vllm", "srppo.rollout.vllm.gpu_memory_utilization=0.25",
                                  *extra], check_files=False)
        srppo = {p.name: p for p in plan_memory(cfg, num_gpus=8, num_nodes=1, gpu_gib=80)}["srppo"]
        sampler = srppo.models[-1]
        assert sampler.role.startswith("vllm sampler") and sampler.gpu_bytes == held
        # the sampler replaces transformers generate: no HF KV cache. Asleep on-policy, it needs its share while
        # it generates, beside every model's states; overlapping the update it holds it throughout
        assert "generate" not in srppo.transient
        if held:
            assert "sampler" not in srppo.transient
            assert srppo.total_bytes == without.states_bytes + without.transient["update"] + held
        else:
            assert srppo.transient["sampler"] == int(0.25 * 80 * GIB)
            assert srppo.total_bytes == without.states_bytes + max(without.transient["update"], int(0.25 * 80 * GIB))
