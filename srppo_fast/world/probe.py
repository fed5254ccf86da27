"""Does a pretrained base have the careful skill? The world's premise, checked after pretraining.

The embedded world only works when the base model can solve problems in its careful mode even though
its default is the hasty one (docs/world.md). That skill appears abruptly during
pretraining, and when it appears depends on the seed and even on floating-point summation order. The
probe makes it visible: greedy answers to held-out problems whose response is started with the first
character of the careful solution, checked by the verifier.
"""

from __future__ import annotations

from ..data import read_records
from ..generation import generate
from ..tokens import render
from .tasks import Problem, careful_solution, verify

SKILL_THRESHOLD = 0.9  # below this, SFT and the RL stage have little to work with


def careful_skill(model, tokenizer, world_dir: str, splits=("eval_id", "eval_ood"), limit: int = 150,
                  batch_size: int = 150) -> dict[str, float]:
    """Verifier accuracy per split of greedy answers started in the careful style (first `limit` problems)."""
    out = {}
    for split in splits:
        questions = [r.messages[-1]["content"] for r in read_records(f"world:{split}", "prompt", world_dir)][:limit]
        starts = [careful_solution(Problem.parse(q))[0] for q in questions]  # the units digit of step one
        prompts = [tokenizer(render(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True) + s,
                             add_special_tokens=False)["input_ids"] for q, s in zip(questions, starts)]
        gens = generate(model, tokenizer, prompts, max_new_tokens=40, do_sample=False, batch_size=batch_size)
        texts = [s + tokenizer.decode(r, skip_special_tokens=True) for s, r in zip(starts, gens.responses)]
        out[split] = sum(verify(q, t) for q, t in zip(questions, texts)) / max(len(questions), 1)
    return out
