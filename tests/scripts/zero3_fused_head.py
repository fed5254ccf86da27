"""A ZeRO-3 sharded lm_head keeps the fused lm_head + log-prob path (test_deepspeed.py launches this under torchrun).

    torchrun --nproc_per_node 2 tests/scripts/zero3_fused_head.py RESULT.json TIED(0|1)

The same tiny Llama twice from one seed: plain (torch) and under srppo-fast's DeepSpeed engine at ZeRO-3 (nothing
kept gathered: stage3_param_persistence_threshold 0). Each rank runs packed_label_logprobs (log-probs and
entropies, temperature 0.8) on its own packed micro-batch through both and backpropagates the same loss.
Writes RESULT.rank<R>.json: the largest differences of the outputs and of every parameter's full gradient
(gathered from its shards), how often the fused op ran forward and backward, and the most rows of any tensor
as wide as the vocabulary that either pass made under ZeRO-3 (the fused op: at most the label positions; the
full-logits fallback: every packed token).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["SRPPO_FAST_IMPL"] = "triton"  # the fused Triton path on CPU tensors (interpreted)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from srppo_fast import dist  # noqa: E402
from srppo_fast.batching import pack_sequences  # noqa: E402
from srppo_fast.config import DeepSpeedConfig, OptimConfig  # noqa: E402
from srppo_fast.engine.deepspeed_engine import DeepSpeedEngine  # noqa: E402
from srppo_fast.experience import packed_label_logprobs  # noqa: E402
from srppo_fast.ops import linear_logprobs  # noqa: E402
from srppo_fast.tokens import TokenizedSet  # noqa: E402

V = 300


def model(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from srppo_fast.attention import register

    register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=V, max_position_embeddings=128, tie_word_embeddings=tied,
                      pad_token_id=None)
    return LlamaForCausalLM(cfg).to(torch.float32)


class WidestVocabTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and t.dim() == 2 and t.shape[-1] == V and not func.is_view:  # not weight.t()
                self.rows = max(self.rows, t.shape[0])
        return out


def main(result: str, tied: str) -> None:
    tied_head = tied == "1"
    device = torch.device("cpu")
    dist.init(device)
    rank = dist.rank()
    rng = np.random.default_rng(100 + rank)  # each rank its own micro-batch
    lengths = [40, 25, 33]
    tokens = rng.integers(0, V, sum(lengths)).astype(np.int32)
    targets = np.concatenate([np.r_[np.zeros(n - 6, bool), np.ones(6, bool)] for n in lengths])  # long prompts
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    batch = pack_sequences(TokenizedSet(tokens, targets, offsets), np.arange(len(lengths)))
    up = torch.from_numpy(rng.standard_normal((2, int(targets.sum())))).float()

    def loss_of(logp, ent):
        return (logp * up[0]).sum() + (ent * up[1]).sum()

    plain = model(tied_head)
    logp_ref, ent_ref = packed_label_logprobs(plain, batch, 0.8, return_entropy=True)
    loss_of(logp_ref, ent_ref).backward()
    for p in plain.parameters():  # the engine's gradient is the ranks' sum (our losses are global shares)
        torch.distributed.all_reduce(p.grad)

    calls = {"forward": 0, "backward": 0}
    fn = linear_logprobs.LinearTokenLogprobsFunction
    fwd, bwd = fn.forward, fn._backward

    def counted_forward(*a):
        calls["forward"] += 1
        return fwd(*a)

    def counted_backward(*a):
        calls["backward"] += 1
        return bwd(*a)

    linear_logprobs.LinearTokenLogprobsFunction.forward = staticmethod(counted_forward)
    linear_logprobs.LinearTokenLogprobsFunction._backward = staticmethod(counted_backward)
    ds = DeepSpeedConfig(zero_stage=3, config={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    engine = DeepSpeedEngine(model(tied_head), OptimConfig(lr=1e-3, grad_clip=0.0), 1, device, "fp32", False, ds)
    head = engine.model.get_output_embeddings().weight
    sharded_between = int(head.numel())  # 0: the head is a shard outside its module's call
    widest = WidestVocabTensor()
    with widest:
        logp, ent = packed_label_logprobs(engine.model, batch, 0.8, return_entropy=True)
        engine.backward(loss_of(logp, ent))
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    plain_params = dict(plain.named_parameters())
    for name, p in engine.model.named_parameters():
        full = safe_get_full_grad(p)  # collective
        grads[name] = float((full - plain_params[name].grad).abs().max())
    out = {"rank": rank, "world": dist.world_size(), "head_numel_outside_call": sharded_between,
           "logp_diff": float((logp - logp_ref).abs().max().detach()),
           "entropy_diff": float((ent - ent_ref).abs().max().detach()),
           "grad_diff": grads, "fused_calls": calls, "widest_vocab_rows": widest.rows,
           "label_positions": int(targets.sum()), "packed_tokens": int(batch.num_tokens)}
    with open(result.replace(".json", f".rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
