"""--dry-run's per-GPU memory plan (DeepSpeed's ZeRO estimators; meta-device parameter counts, no network)."""

import pytest

pytest.importorskip("deepspeed")

from srppo_fast.cli import main  # noqa: E402
from srppo_fast.config import load_config  # noqa: E402
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
    # ZeRO-3, 8 GPUs: ~18 bytes/param / 8 + the largest layer for each trainable model
    assert 17 * GIB <= sft.gpu_bytes <= 21 * GIB
    frozen = srppo.models[2]
    assert frozen.sharded and frozen.gpu_bytes == -(-frozen.params * 2 // 8)
    assert srppo.fits and plans["sft"].fits and plans["sft_extended"].fits
    assert plans["eval"].skipped


def test_paper_config_dry_run_prints_the_plan(capsys):
    assert main(["train", "--config", PAPER, "--dry-run"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("memory plan (DeepSpeed ZeRO-3 estimators, 8 GPUs x 80 GiB, bf16"):]
    assert "activations and KV cache not included" in block
    for stage in ("sft:", "sft_extended:", "srppo:"):
        assert f"  {stage}\n" in block
    assert "actor (trainable" in block and "critic (trainable" in block
    assert "frozen sft (" in block and "frozen base (" in block and "sharded over 8 GPUs" in block
    assert block.count(": fits") == 3 and "DOES NOT FIT" not in block
    assert "eval: runs on rank 0, not planned" in block


def test_a_plan_that_does_not_fit_says_so(capsys):
    assert main(["train", "--config", PAPER, "--dry-run", "runtime.gpu_memory_gib=8", "deepspeed.zero_stage=2"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-2 estimators" in out and "x 8 GiB" in out
    assert "DOES NOT FIT" in out and ": fits" not in out
    assert "whole copy per GPU" in out  # frozen models are not sharded below ZeRO-3


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
    pytest.importorskip("vllm", reason="rollout.engine=vllm needs vLLM installed to validate")
    base = load_config(PAPER, check_files=False)
    without = {p.name: p for p in plan_memory(base, num_gpus=8, num_nodes=1, gpu_gib=80)}["srppo"]
    for extra, held in ((["srppo.rollout.async=false"], 0), (["srppo.rollout.async=true"], int(0.25 * 80 * GIB))):
        cfg = load_config(PAPER, ["srppo.rollout.engine=vllm", "srppo.rollout.vllm.gpu_memory_utilization=0.25",
                                  *extra], check_files=False)
        srppo = {p.name: p for p in plan_memory(cfg, num_gpus=8, num_nodes=1, gpu_gib=80)}["srppo"]
        sampler = srppo.models[-1]
        assert sampler.role.startswith("vllm sampler") and sampler.gpu_bytes == held
        assert srppo.total_bytes == without.total_bytes + held
