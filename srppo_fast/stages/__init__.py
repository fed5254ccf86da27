"""Stage runners, by config name. Each takes (RunContext, stage name) and leaves a checkpoint."""

from .lm import run_lm_stage

STAGES = {"pretrain": run_lm_stage, "sft": run_lm_stage}
