"""What a stage kind is: one class per kind (lm, spin, rl, eval) that owns its config section type, its validation,
the models and data it reads, its line in `--dry-run`'s plan and in the memory plan, its model card's words and its
run. The registry (`stages/__init__.py`) lists the kinds; nothing outside `stages/` asks which kind a stage is.

A stage is an instance of its kind for one named section of one config: `stage_of(cfg, "srppo_b1")`."""

from __future__ import annotations

import difflib
import os
from typing import ClassVar

from ..config import WORLD_SPLITS, Config, OptimConfig, RolloutConfig, is_gguf, shown
from ..errors import ConfigError


class Stage:
    """One stage of a config: its kind's behaviour over `cfg.section(name)`. Subclasses set the class attributes
    and override what their kind does; the defaults describe a stage that trains one model from `init`."""

    kind: ClassVar[str]  # the registry's name for the kind (`kind: <it>` in a named section without a stage type)
    section_type: ClassVar[type]  # the dataclass of its config section (sections.py, or the kind's own module)
    label: ClassVar[str] = ""  # how tables name its models when no stage type names them (default: the kind)
    makes_model: ClassVar[bool] = True  # leaves a checkpoint other stages may read
    whole_models_on_rank0: ClassVar[bool] = False  # eval: rank 0 alone, whole models, one at a time
    resumable: ClassVar[bool] = True  # leaves a resumable checkpoint (eval writes a table)
    profiled: ClassVar[bool] = False  # `srppo-fast profile` measures this kind's steps

    def __init__(self, cfg: Config, name: str):
        self.cfg, self.name, self.section = cfg, name, cfg.section(name)

    # ---- the config ----------------------------------------------------------------------------------------------

    def validate(self, before: list[str], check_files: bool) -> None:
        """Raise one ConfigError for a section that contradicts itself or the stages `before` it."""
        raise NotImplementedError

    def model_keys(self) -> dict[str, str]:
        """Config key -> model reference ('base', a stage, a path) of every model the stage reads, a reward model's
        path included (they must all share the run's tokenizer)."""
        return {f"{self.name}.init": self.section.init}

    def model_refs(self) -> list[str]:
        """The models the stage reads as 'base', stages or paths (not a reward model), in a fixed order."""
        return [self.section.init]

    def trains_adapters(self) -> bool:
        """Under model.lora the stage trains LoRA adapters on a frozen base (Config.trains_adapters)."""
        return self.cfg.trains_adapters(self.name)

    def external_models(self) -> dict[str, str]:
        """Models the stage reads that are not policies ('base', stages, checkpoints): config key -> path."""
        return {}

    def data_specs(self) -> list[str]:
        """The data the stage reads (files, directories, world:<split>, hf:<name>)."""
        raise NotImplementedError

    def data_checks(self) -> list[tuple[str, str, bool]]:
        """(spec, what its records must hold: lm, sft or prompt, whether each needs a final answer) per data spec."""
        raise NotImplementedError

    def rollout(self) -> RolloutConfig | None:
        """The stage's sampler settings, when it samples from its model."""
        return None

    def longest_sample(self) -> int:
        """Longest prompt + response the stage samples (its sampler's context)."""
        ro = self.rollout()
        return self.section.max_prompt_len + ro.max_new_tokens if ro is not None else 0

    # ---- the plan and the card -----------------------------------------------------------------------------------

    def plan_line(self) -> str:
        """The stage in `--dry-run`'s plan: one line of what it will do."""
        raise NotImplementedError

    def describe(self) -> str:
        """What kind of model the stage makes, in a few words (its model card)."""
        raise NotImplementedError

    def card_rows(self) -> list[str]:
        """Extra rows of the model card's table."""
        return []

    def memory_models(self) -> list[tuple[str, str, bool, str, list[str]]]:
        """(role, ref, trainable, model class, config keys served) of each model the stage holds at once."""
        return [("model", self.section.init, True, "causal_lm", [f"{self.name}.init"])]

    def update_tokens(self) -> int | None:
        """Token budget of one packed micro-batch of its updates (None: it trains nothing)."""
        return self.section.micro_batch_tokens

    def generate_shape(self) -> tuple[int, int] | None:
        """(sequences, longest prompt + response) of one transformers generate call on its own model, if any."""
        ro = self.rollout()
        if ro is None or ro.engine != "hf":
            return None
        return ro.batch_size, self.longest_sample()

    def outcome(self, ctx) -> str:
        """The stage in the run's last log line, for a stage that leaves no model."""
        return self.name

    # ---- running -------------------------------------------------------------------------------------------------

    def run(self, ctx) -> None:
        """Train (or evaluate), leaving a checkpoint (or a table); resumes from the stage's own resumable save."""
        raise NotImplementedError

    # ---- shared checks -------------------------------------------------------------------------------------------

    def check_data_spec(self, spec: str, key: str, check_files: bool) -> None:
        check_data_spec(spec, key, check_files)

    def check_model_ref(self, ref: str, key: str, before: list[str], check_files: bool) -> None:
        """A model reference: 'base', a model-making stage that runs earlier (or left a checkpoint), or a
        directory / hub name (anything with a '/')."""
        if ref == "base":
            return
        stages = self.cfg.model_stages()
        if ref in stages:
            if ref in before:
                return
            ckpt = os.path.join(self.cfg.output_dir, "checkpoints", ref)
            if check_files and os.path.isdir(ckpt):
                return
            raise ConfigError(f"{key} is '{ref}', which does not run before it and has no checkpoint in {ckpt}; "
                              f"list '{ref}' earlier in stages, or point {key} at base or a directory.")
        if "/" in ref or os.path.isdir(ref) or is_gguf(ref):
            return
        close = difflib.get_close_matches(ref, ["base", *stages], n=1)
        hint = f"did you mean '{close[0]}'?" if close else "use base, a stage name, or a directory or hub name."
        raise ConfigError(f"{key}: '{ref}' is not a stage, 'base' or a path; {hint}")

    def check_rollout(self) -> None:
        """The sampler settings against each other."""
        ro, where = self.rollout(), f"{self.name}.rollout"
        if ro.engine == "hf":
            if ro.async_:
                raise ConfigError(f"{where}.async is true but {where}.engine is 'hf', which samples with the actor "
                                  "module itself (the update changes it while it would generate); set "
                                  f"{where}.engine=vllm, or async=false.")
            if ro.tis_cap is not None:
                raise ConfigError(f"{where}.tis_cap needs the sampler's own log-probs, which the 'hf' engine does not "
                                  f"keep (it is the actor: nothing to correct); set {where}.engine=vllm, or remove "
                                  "tis_cap.")
            return
        # a vLLM sampler: its settings against the machine are machine.py's (check_config, problems)


def check_data_spec(spec: str, key: str, check_files: bool) -> None:
    """A data reference: world:<split>, hf:<name>, or a path that exists (when files are checked)."""
    if spec.startswith("world:"):
        split = spec.split(":", 1)[1]
        if split not in WORLD_SPLITS:
            raise ConfigError(f"{key}: unknown world split '{split}'; use one of "
                              + ", ".join(f"world:{s}" for s in WORLD_SPLITS) + ".")
        return
    if spec.startswith("hf:"):
        if not spec[3:]:
            raise ConfigError(f"{key}: 'hf:' needs a dataset name, e.g. hf:allenai/tulu-v2-sft-mixture.")
        return  # a hub dataset: only loading can tell
    if not spec:
        raise ConfigError(f"{key} is empty; give a JSONL file, a local dataset directory or world:<split>.")
    if check_files and not os.path.exists(spec):
        raise ConfigError(f"{key}: '{spec}' does not exist; fix the path, or use an embedded split such as "
                          "world:demos.")


def check_optim(optim: OptimConfig, key: str) -> None:
    betas = optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"{key}.betas must be two numbers in [0, 1), got {shown(betas)}.")

