"""The stage kinds. `KINDS` is the one list of them: a kind is a `Stage` subclass (stages/base.py) in its own module
here, and adding one is that module plus its line below. A config's stages are named sections (config.py), each of
a stage type whose section type picks its kind."""

from ..config import Config, RolloutConfig
from .base import Stage
from .eval import EvalStage
from .lm import LMStage
from .rl import RLStage
from .spin import SpinStage

KINDS: tuple[type[Stage], ...] = (LMStage, SpinStage, RLStage, EvalStage)

_BY_SECTION = {kind.section_type: kind for kind in KINDS}


def stage_of(cfg: Config, name: str) -> Stage:
    """The stage called `name` in `cfg`, as its kind."""
    return _BY_SECTION[type(cfg.section(name))](cfg, name)


def samplers(cfg: Config) -> dict[str, RolloutConfig]:
    """The rollout section of each stage of the run that samples from its model, in run order."""
    return {name: ro for name in cfg.stages if (ro := stage_of(cfg, name).rollout()) is not None}


__all__ = ["KINDS", "Stage", "samplers", "stage_of"]
