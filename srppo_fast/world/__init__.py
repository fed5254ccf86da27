"""The embedded task world: arithmetic worksheets by two personas, with programmatic verifiers."""

from .build import EVAL_HOLDOUT, WORLD_CHAT_TEMPLATE, build_world, generate_records
from .tasks import Problem, is_careful, parse_answer, verify

__all__ = ["EVAL_HOLDOUT", "WORLD_CHAT_TEMPLATE", "Problem", "build_world", "generate_records", "is_careful",
           "parse_answer", "verify"]
