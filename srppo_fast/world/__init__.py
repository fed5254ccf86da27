"""The embedded task world: arithmetic worksheets by two personas, with programmatic verifiers."""

from .build import EVAL_HOLDOUT, WORLD_CHAT_TEMPLATE, build_world, generate_records
from .tasks import Problem, careful_share, is_careful, parse_answer, verify


def sample_metrics(questions: list[str], responses: list[str]) -> dict[str, float]:
    """What the world can tell about a batch of answers: verifier accuracy and the careful persona's share (its
    worked format, checked against each question; n/a for no answers)."""
    n = max(len(responses), 1)
    return {"accuracy": sum(verify(q, r) for q, r in zip(questions, responses)) / n,
            "careful_rate": careful_share(questions, responses)}


def verifier_for(spec: str):
    """sample_metrics for data that comes from the world (a `world:` split), else None: nothing to verify with."""
    return sample_metrics if spec.startswith("world:") else None

__all__ = ["EVAL_HOLDOUT", "WORLD_CHAT_TEMPLATE", "Problem", "build_world", "generate_records", "is_careful",
           "parse_answer", "sample_metrics", "verifier_for", "verify"]
