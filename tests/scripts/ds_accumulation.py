"""Gradient accumulation over micro-batches, torch engine against DeepSpeed at every ZeRO stage and precision
(test_deepspeed.py runs this in one process): the same model, a step of three micro-batches, then a second step.

    python tests/scripts/ds_accumulation.py RESULT.json

Writes {"torch-fp32": [grad_norm step 1, step 2], "deepspeed-zero3-bf16": [...], ...}.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from srppo_fast.config import DeepSpeedConfig, OptimConfig  # noqa: E402
from srppo_fast.engine.deepspeed_engine import DeepSpeedEngine  # noqa: E402
from srppo_fast.engine.torch_engine import TorchEngine  # noqa: E402

COMBOS = [("torch", None, "fp32"), ("torch", None, "bf16"), *(("deepspeed", z, "fp32") for z in (0, 1, 2, 3)),
          *(("deepspeed", z, "bf16") for z in (2, 3))]


def norms(kind: str, stage: int | None, precision: str) -> list[float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=None))
    optim = OptimConfig(lr=1e-3, warmup_ratio=0.0, grad_clip=1.0)
    device = torch.device("cpu")
    engine = TorchEngine(model, optim, 10, device, precision) if kind == "torch" else \
        DeepSpeedEngine(model, optim, 10, device, precision, False, DeepSpeedConfig(zero_stage=stage))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (1, 16), generator=g) for _ in range(3)]
    out = []
    for _ in range(2):
        for x in batches:
            with engine.autocast():
                loss = engine.model(input_ids=x, labels=x).loss / len(batches)
            engine.backward(loss)
        out.append(engine.step(True)["grad_norm"])
    engine.close()
    return out


def main(result: str) -> None:
    torch.set_num_threads(1)
    found = {f"{kind}{'' if stage is None else f'-zero{stage}'}-{precision}": norms(kind, stage, precision)
             for kind, stage, precision in COMBOS}
    with open(result, "w", encoding="utf-8") as fh:
        json.dump(found, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
