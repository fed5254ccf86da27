"""The embedded world: deterministic, disjoint splits, verifier, personas, tokenizer."""

from __future__ import annotations

import random

import pytest

from srppo_fast.config import WorldConfig
from srppo_fast.world import generate_records, is_careful, parse_answer, verify
from srppo_fast.world.tasks import Problem, all_problems, careful_solution, hasty_solution, slip

from .conftest import TINY_WORLD


def test_careful_solutions_are_right_for_every_problem():
    for family in ("add", "sub"):
        for p in all_problems(family):
            text = careful_solution(p)
            assert verify(p.question, text), text
            assert is_careful(text)


@pytest.mark.parametrize("question,text,expected", [
    ("37+45", "7+5=12 carry 1; 3+4+1=8; answer 82", True),
    ("82-45", "12-5=7 borrow 1; 8-1-4=3; answer 37", True),
    ("82-45", "answer 37", True),
    ("82-45", "answer 47", False),
    ("82-45", "answer 3 answer 37", True),  # the last answer counts
    ("82-45", "12-5=7; 37", False),  # no `answer`
])
def test_verifier_hand_cases(question, text, expected):
    assert verify(question, text) is expected


def test_worked_examples():
    assert careful_solution(Problem("add", 37, 45)) == "7+5=12 carry 1; 3+4+1=8; answer 82"
    assert careful_solution(Problem("add", 99, 99)) == "9+9=18 carry 1; 9+9+1=19; answer 198"
    assert careful_solution(Problem("sub", 82, 45)) == "12-5=7 borrow 1; 8-1-4=3; answer 37"
    assert careful_solution(Problem("sub", 45, 41)) == "5-1=4; 4-4=0; answer 4"
    assert parse_answer("no number") is None


def test_hasty_accuracy_and_slips():
    rng = random.Random(0)
    problems = all_problems("add")[:2000]
    right = sum(verify(p.question, hasty_solution(p, rng, 0.5)) for p in problems) / len(problems)
    assert abs(right - 0.5) < 0.04
    assert all(slip(p, rng) != p.result and slip(p, rng) >= 0 for p in all_problems("sub")[:500])


def test_records_are_deterministic_and_splits_disjoint():
    cfg = WorldConfig(**TINY_WORLD)
    a, b = generate_records(cfg), generate_records(cfg)
    assert a == b
    assert generate_records(WorldConfig(**{**TINY_WORLD, "seed": 1}))["demos"] != a["demos"]
    held = {split: {r["prompt"] for r in a[split]} for split in ("eval_id", "eval_ood", "demos_heldout", "demos")}
    assert held["eval_id"].isdisjoint(held["demos"] | held["demos_heldout"])
    assert held["demos"].isdisjoint(held["demos_heldout"])
    corpus_questions = {m["content"] for r in a["corpus"] for m in r["messages"] if m["role"] == "user"}
    assert corpus_questions.isdisjoint(held["eval_id"] | held["eval_ood"] | held["demos_heldout"])
    prompts = {r["prompt"] for r in a["prompts"]}
    assert prompts.isdisjoint(held["eval_id"] | held["eval_ood"] | held["demos_heldout"])
    assert {r["task"] for r in a["prompts"]} == {"add", "sub"}  # broader than the demonstrations
    assert {r["task"] for r in a["demos"]} == {"add"}
    assert all(r["task"] == "sub" for r in a["eval_ood"])
    assert all(verify(r["prompt"], r["response"]) for r in a["demos"])


def test_corpus_personas_follow_the_config():
    cfg = WorldConfig(**{**TINY_WORLD, "num_corpus_docs": 2000, "careful_fraction": 0.3})
    corpus = generate_records(cfg)["corpus"]
    careful = [r for r in corpus if r["persona"] == "careful"]
    assert abs(len(careful) / len(corpus) - 0.3) < 0.04
    for r in corpus[:200]:  # one persona per worksheet
        styles = {is_careful(m["content"]) for m in r["messages"] if m["role"] == "assistant"}
        assert styles == {r["persona"] == "careful"}


def test_tokenizer_splits_digits_and_keeps_the_chat_format(tokenizer):
    ids = tokenizer("37+45", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["3", "7", "+", "4", "5"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1+2"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<bos>Q: 1+2\nA: "
    sample = "7+5=12 carry 1; 3+4+1=8; answer 82"
    assert tokenizer.decode(tokenizer(sample, add_special_tokens=False)["input_ids"]) == sample
