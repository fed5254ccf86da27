"""Packed micro-batches: attention never crosses sequences, so packed and one-by-one forwards agree, in
per-token log-probs and in every parameter's gradient, for each architecture and attention we support on
the CPU.

Tolerances (fp32). Packed and one-by-one forwards do the same arithmetic in a different order (one
[N, H] matmul against five [T_i, H] ones; a weight's gradient summed inside one GEMM against five
added), so they differ by rounding only; so do sdpa and varlen_sdpa against eager. Over every case
below, on 1 and on 2 threads, the worst differences measured are 9.5e-7 on log-probs of magnitude ~6
(2 ulp) and 8.2e-7 x |grad|max (the largest entry of that parameter's gradient). We allow 1e-5 on
log-probs and 1e-5 x |grad|max on each parameter's gradient: 10x the rounding seen, and 4 orders of
magnitude below what a bug does. Attending across the boundaries moves log-probs by 0.10-0.17 and every
parameter's gradient by >= 0.24 x |grad|max; ignoring a 16-token window moves log-probs by 0.11-0.17
and gradients by up to 0.47-0.71 x |grad|max (the guards at the end keep these claims checked).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srppo_fast.batching import pack_sequences
from srppo_fast.ops import token_logprobs
from srppo_fast.stages.lm import packed_token_logprobs
from srppo_fast.tokens import load_lm_data

from .helpers import TINY_ARCH, make_model

# Every config: hidden 64, 2 layers, 2 query heads sharing 1 key/value head (GQA), head_dim 32.
MISTRAL = {**TINY_ARCH, "model_type": "mistral"}
QWEN2 = {**TINY_ARCH, "model_type": "qwen2"}  # q/k/v projections with biases
ARCHS = {
    "llama": TINY_ARCH,
    "mistral": {**MISTRAL, "sliding_window": None},
    "mistral-window64": {**MISTRAL, "sliding_window": 64},  # wider than the longest sequence
    "mistral-window16": {**MISTRAL, "sliding_window": 16},  # narrower than the shortest: the window bites
    "qwen2": QWEN2,
    # Qwen2's hybrid layout: layer 0 full attention, layer 1 a 16-token window
    "qwen2-window16": {**QWEN2, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
}
WINDOWED = ("mistral-window16", "qwen2-window16")
ATTNS = ["varlen_sdpa", "sdpa", "eager"]
SEQ_IDS = np.array([3, 0, 7, 1, 12])  # ragged lengths (34-41 tokens), out of order
VALUE_ATOL = 1e-5
GRAD_SCALE_TOL = 1e-5

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from threads, and on a loaded 2-core machine two OpenMP threads
    spin against each other (this file: 145 s against 10 s). The tolerances hold on 2 threads as well."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demos(world_dir, tokenizer):
    data = load_lm_data("world:demos_heldout", tokenizer, kind="sft", loss_on="response", max_seq_len=128,
                        world_dir=world_dir)
    lengths = data.lengths[SEQ_IDS]
    # the window cases mean what their names say: 16 < every length, 64 > every length
    assert 16 < lengths.min() and lengths.max() < 64 and len(set(lengths.tolist())) > 1, lengths
    return data


def unpacked_logprobs(model, demos, seq_ids) -> list[torch.Tensor]:
    """Each sequence alone through the model: [T_i - 1] log-probs of tokens 1..T_i-1 (0 off-target)."""
    out = []
    for i in seq_ids:
        tokens, targets = demos.sequence(i)
        ids = torch.as_tensor(tokens, dtype=torch.long).unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]  # predicts tokens 1..T-1
        labels = torch.as_tensor(tokens[1:], dtype=torch.long).masked_fill(~torch.as_tensor(targets[1:]), -100)
        out.append(token_logprobs(logits, labels))
    return out


def logprobs_and_grads(model, demos, packed: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Per-sequence log-probs ([T_i - 1] each) of SEQ_IDS, packed into one row or one by one, and every
    parameter's gradient of their negated sum."""
    model.zero_grad(set_to_none=True)
    if packed:
        batch = pack_sequences(demos, SEQ_IDS)
        flat = packed_token_logprobs(model, batch)  # [N]
        loss = -flat.sum()
        per_seq = batch.unpack(flat.detach())  # [n, max_len]
        lengths = demos.lengths[SEQ_IDS]
        assert all((per_seq[row, n - 1:] == 0).all() for row, n in enumerate(lengths))  # last token: no label
        logps = [per_seq[row, :n - 1] for row, n in enumerate(lengths)]
    else:
        logps = unpacked_logprobs(model, demos, SEQ_IDS)
        loss = -sum(lp.sum() for lp in logps)
        logps = [lp.detach() for lp in logps]
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    return logps, grads


def assert_same(got, ref) -> None:
    """Log-probs within VALUE_ATOL; each parameter's gradient within GRAD_SCALE_TOL x its largest entry."""
    (got_logps, got_grads), (ref_logps, ref_grads) = got, ref
    for row, (g, r) in enumerate(zip(got_logps, ref_logps)):
        torch.testing.assert_close(g, r, atol=VALUE_ATOL, rtol=0, msg=lambda m, row=row: f"sequence {row}: {m}")
    assert got_grads.keys() == ref_grads.keys()
    for name, r in ref_grads.items():
        scale = r.abs().max()
        assert scale > 0, f"{name}: zero gradient, the comparison would check nothing"
        torch.testing.assert_close(got_grads[name], r, atol=GRAD_SCALE_TOL * float(scale), rtol=0,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("attn", ATTNS)
def test_packed_equals_unpacked(tokenizer, demos, arch, attn):
    """Log-probs and every parameter's gradient: one packed row == each sequence alone (same attention)."""
    model = make_model(tokenizer, ARCHS[arch], attn).eval()
    if arch.startswith("qwen2"):
        assert any(name.endswith("self_attn.q_proj.bias") for name, _ in model.named_parameters())
    assert_same(logprobs_and_grads(model, demos, packed=True), logprobs_and_grads(model, demos, packed=False))
    batch = pack_sequences(demos, SEQ_IDS)
    assert batch.num_targets == sum(int(demos.sequence(i)[1][1:].sum()) for i in SEQ_IDS)


def reference_cases():
    for arch in ARCHS:
        for attn in ("varlen_sdpa", "sdpa"):
            yield pytest.param(arch, attn, id=f"{attn}-{arch}")


@pytest.mark.parametrize("arch, attn", list(reference_cases()))
def test_packed_equals_eager_reference(tokenizer, demos, arch, attn):
    """The packed forward with `attn` computes the model: transformers' eager attention on each sequence
    alone (with the config's sliding window) is the reference, same weights."""
    model = make_model(tokenizer, ARCHS[arch], attn).eval()
    reference = make_model(tokenizer, ARCHS[arch], "eager").eval()
    reference.load_state_dict(model.state_dict())
    assert_same(logprobs_and_grads(model, demos, packed=True), logprobs_and_grads(reference, demos, packed=False))


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
    """Guard for the tolerances above: with the restart removed from position_ids (one long sequence),
    transformers attends across sequences; log-probs and every gradient move far beyond tolerance."""
    model = make_model(tokenizer, attn="sdpa").eval()
    batch = pack_sequences(demos, SEQ_IDS)
    batch.position_ids = torch.arange(batch.num_tokens).unsqueeze(0)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    flat = token_logprobs(logits[0], batch.labels[0])
    (-flat.sum()).backward()
    leaky = {name: p.grad.clone() for name, p in model.named_parameters()}
    per_seq = batch.unpack(flat.detach())
    logps, grads = logprobs_and_grads(model, demos, packed=False)
    assert (per_seq[1, :len(logps[1])] - logps[1]).abs().max() > 100 * VALUE_ATOL
    for name, g in grads.items():
        assert (leaky[name] - g).abs().max() > 1000 * GRAD_SCALE_TOL * g.abs().max(), name


@pytest.mark.parametrize("arch", WINDOWED)
def test_the_sliding_window_changes_the_model(tokenizer, demos, arch):
    """Guard: on these sequences a 16-token window changes log-probs and gradients far beyond tolerance,
    so the window cases above can fail; a 64-token window matches full attention."""
    full = {**ARCHS[arch], "sliding_window": None, "use_sliding_window": False}
    if arch.startswith("mistral"):
        full.pop("use_sliding_window")
    windowed = logprobs_and_grads(make_model(tokenizer, ARCHS[arch], "eager").eval(), demos, packed=False)
    plain = logprobs_and_grads(make_model(tokenizer, full, "eager").eval(), demos, packed=False)
    assert max((a - b).abs().max() for a, b in zip(windowed[0], plain[0])) > 100 * VALUE_ATOL
    assert max(float((windowed[1][n] - plain[1][n]).abs().max() / plain[1][n].abs().max()) for n in plain[1]) \
        > 1000 * GRAD_SCALE_TOL
    if arch == "mistral-window16":
        wide = logprobs_and_grads(make_model(tokenizer, ARCHS["mistral-window64"], "eager").eval(), demos,
                                  packed=False)
        assert_same(wide, plain)
