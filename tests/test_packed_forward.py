"""Packed micro-batches: attention never crosses sequences, so packed and one-by-one forwards agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srppo_fast.batching import pack_sequences
from srppo_fast.data import load_lm_data
from srppo_fast.ops import token_logprobs
from srppo_fast.stages.lm import packed_token_logprobs

from .conftest import TINY_ARCH, make_model

ARCHS = {
    "llama": TINY_ARCH,
    "mistral": {**TINY_ARCH, "model_type": "mistral", "sliding_window": None},
    "qwen2": {**TINY_ARCH, "model_type": "qwen2"},
}


@pytest.fixture(scope="module")
def demos(world_dir, tokenizer):
    return load_lm_data("world:demos_heldout", tokenizer, kind="sft", loss_on="response", max_seq_len=128,
                        world_dir=world_dir)


def unpacked_logprobs(model, demos, seq_ids) -> list[torch.Tensor]:
    out = []
    for i in seq_ids:
        tokens, targets = demos.sequence(i)
        ids = torch.as_tensor(tokens, dtype=torch.long).unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]  # predicts tokens 1..T-1
        labels = torch.as_tensor(tokens[1:], dtype=torch.long).masked_fill(~torch.as_tensor(targets[1:]), -100)
        out.append(token_logprobs(logits, labels))
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("attn", ["varlen_sdpa", "sdpa", "eager"])
def test_packed_equals_unpacked(tokenizer, demos, arch, attn):
    torch.manual_seed(0)
    model = make_model(tokenizer, ARCHS[arch], attn).eval()
    seq_ids = np.array([3, 0, 7, 1, 12])  # ragged lengths, out of order
    batch = pack_sequences(demos, seq_ids)
    with torch.no_grad():
        packed = packed_token_logprobs(model, batch)  # [N]
        per_seq = batch.unpack(packed)  # [n, max_len]
        reference = unpacked_logprobs(model, demos, seq_ids)
    for row, ref in enumerate(reference):
        got = per_seq[row, :len(ref)]
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
        assert (per_seq[row, len(ref):] == 0).all()  # last token of a sequence has no label
    assert batch.num_targets == sum(int((r != 0).sum()) for r in reference)


def test_packed_gradients_equal_unpacked(tokenizer, demos):
    torch.manual_seed(0)
    model = make_model(tokenizer)
    seq_ids = np.array([2, 5, 9])
    batch = pack_sequences(demos, seq_ids)
    (-packed_token_logprobs(model, batch).sum()).backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (-sum(lp.sum() for lp in unpacked_logprobs(model, demos, seq_ids))).backward()
    for got, ref in zip(packed_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_labels_never_cross_sequences(demos):
    batch = pack_sequences(demos, np.array([0, 1, 2]))
    ends = batch.cu_seqlens[1:].long() - 1
    assert (batch.labels[0, ends] == -100).all()
    starts = batch.cu_seqlens[:-1].long()
    assert (batch.position_ids[0, starts] == 0).all()
    tokens = batch.input_ids[0]
    valid = batch.labels[0] != -100
    idx = torch.nonzero(valid).squeeze(-1)
    assert torch.equal(batch.labels[0, idx], tokens[idx + 1])


def test_a_model_that_ignored_boundaries_would_be_caught(tokenizer, demos):
    """Guard for the test above: with the restart removed from position_ids (one long sequence),
    transformers attends across sequences and the log-probs differ."""
    torch.manual_seed(0)
    model = make_model(tokenizer, attn="sdpa").eval()
    batch = pack_sequences(demos, np.array([3, 0, 7]))
    batch.position_ids = torch.arange(batch.num_tokens).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        per_seq = batch.unpack(token_logprobs(logits[0], batch.labels[0]))
        reference = unpacked_logprobs(model, demos, [3, 0, 7])
    assert (per_seq[1, :len(reference[1])] - reference[1]).abs().max() > 1e-3
