"""Stage runners, by config name. Each takes (RunContext, stage name) and leaves a checkpoint (eval: a table)."""

from ..config import STAGE_TYPES
from ..evaluation import run_eval_stage
from .lm import run_lm_stage
from .rl import run_rl_stage
from .spin import run_spin_stage

_RUNNERS = {"lm": run_lm_stage, "rl": run_rl_stage, "spin": run_spin_stage, "eval": run_eval_stage}
STAGES = {name: _RUNNERS[kind] for name, kind in STAGE_TYPES.items()}
