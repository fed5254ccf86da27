"""The `eval` stage: every model of a run on every evaluation set -> eval.json and eval.md (and each evaluated
stage's model card). Per model and set: evaluation.py's measurements."""

from __future__ import annotations

import json
import logging
import time

from ..config import EvalConfig
from ..errors import ConfigError
from ..evaluation import evaluate_model, load_eval_set, markdown_table
from ..io import atomic_write_text
from .base import Stage, check_data_spec

log = logging.getLogger("srppo_fast")


class EvalStage(Stage):
    """Greedy answers, verifier accuracy and reference log-likelihood of models; rank 0 alone, one model at a time."""

    kind = "eval"
    section_type = EvalConfig
    whole_models_on_rank0 = True
    makes_model = False
    resumable = False

    def validate(self, before: list[str], check_files: bool) -> None:
        ev, name = self.section, self.name
        for ref in ev.models:
            self.check_model_ref(str(ref), f"{name}.models", before, check_files)
        if not ev.models and not any(self.cfg.makes_model(s) for s in before) and self.cfg.model.base == "scratch":
            raise ConfigError(f"{name} has nothing to evaluate: no model-making stage runs before it and model.base "
                              "is 'scratch'; list models in eval.models or stages before eval.")
        if not ev.splits:
            raise ConfigError(f"{name}.splits is empty; give at least one evaluation set, e.g. world:eval_id.")
        for spec in ev.splits:
            check_data_spec(str(spec), f"{name}.splits", check_files)

    def model_refs(self) -> list[str]:
        """eval.models, or every model-making stage before it (and 'base' unless it is scratch)."""
        if self.section.models:
            return [str(m) for m in self.section.models]
        before = self.cfg.stages[:self.cfg.stages.index(self.name)]
        return ([] if self.cfg.model.base == "scratch" else ["base"]) + [s for s in before if self.cfg.makes_model(s)]

    def model_keys(self) -> dict[str, str]:
        return {f"{self.name}.models[{i}] ({ref})": ref for i, ref in enumerate(self.model_refs())}

    def data_specs(self) -> list[str]:
        return [str(s) for s in self.section.splits]

    def data_checks(self) -> list[tuple[str, str, bool]]:
        return [(spec, "prompt", False) for spec in self.data_specs()]

    def memory_models(self) -> list[tuple[str, str, bool, str, list[str]]]:
        return [(f"frozen {ref}", ref, False, "causal_lm", [f"{self.name}.models"]) for ref in self.model_refs()]

    def update_tokens(self) -> None:
        return None

    def generate_shape(self) -> tuple[int, int]:
        return self.section.batch_size, 512 + self.section.max_new_tokens  # prompts unknown before the data: 512

    def plan_line(self) -> str:
        s = self.section
        return f"{self.name}: models=[{', '.join(self.model_refs())}] splits={s.splits} greedy " \
               f"max_new_tokens={s.max_new_tokens}"

    def describe(self) -> str:
        return "evaluation"

    def outcome(self, ctx) -> str:
        return f"{self.name} (table in {ctx.out / 'eval.md'})"

    def run(self, ctx) -> None:
        run_eval_stage(ctx, self.name)


def run_eval_stage(ctx, name: str) -> None:
    """1. evaluation sets -> 2. each model: greedy answers, verifier, log-likelihood -> 3. eval.json, eval.md."""
    ev: EvalConfig = ctx.cfg.section(name)
    tok = ctx.tokenizer()
    sets = [load_eval_set(str(spec), tok, ctx.world_dir) for spec in ev.splits]
    refs = EvalStage(ctx.cfg, name).model_refs()
    ctx.check_models(name, {f"{name}.models[{i}] ({ref})": ref for i, ref in enumerate(refs)})
    ctx.metrics.drop(name)  # a re-run replaces the stage's rows, never doubles them
    results = {}
    for ref in refs:
        t0 = time.perf_counter()
        model = ctx.load_frozen(name, ref, shard=False)  # the run's precision, whole on rank 0
        with ctx.autocast():
            results[ref] = evaluate_model(model, tok, sets, ev, ctx.device)
        for split, row in results[ref].items():
            ctx.metrics.log({"stage": name, "model": ref, "split": split, **row})
        log.info("eval %s (%.1fs): %s", ref, time.perf_counter() - t0,
                 "; ".join(f"{s}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items())
                           for s, row in results[ref].items()))
        del model
    atomic_write_text(ctx.out / "eval.json", json.dumps(results, indent=1))
    table = markdown_table(results, {ref: ctx.cfg.label(ref) for ref in results})
    atomic_write_text(ctx.out / "eval.md", table + "\n")
    log.info("evaluation table (%s):\n%s", ctx.out / "eval.md", table)
    ctx.add_eval_to_cards(results)
