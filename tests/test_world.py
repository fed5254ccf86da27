"""The embedded world: deterministic, disjoint splits, verifier, personas, tokenizer."""

from __future__ import annotations

import math
import random

import pytest

from srppo_fast.config import WorldConfig
from srppo_fast.evaluation import markdown_table
from srppo_fast.world import generate_records, is_careful, parse_answer, verify
from srppo_fast.world.tasks import Problem, all_problems, careful_share, careful_solution, hasty_solution, slip

from .helpers import TINY_WORLD


def test_careful_solutions_are_right_for_every_problem():
    for family in ("add", "sub"):
        for p in all_problems(family):
            text = careful_solution(p)
            assert verify(p.question, text), text
            assert is_careful(text) and is_careful(text, p.question), text


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


def test_hasty_answers_are_never_careful():
    rng = random.Random(1)
    for p in all_problems("add")[::7] + all_problems("sub")[::7]:
        text = hasty_solution(p, rng, 0.5)
        assert not is_careful(text) and not is_careful(text, p.question), text


def test_gibberish_is_never_careful():
    # what an untrained model writes: the world's characters in random order, and text that merely does not
    # start with `answer` (which the old rule counted as careful)
    rng = random.Random(2)
    alphabet = "0123456789+-=; answercarybow\n"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += ["", " ", "82", "I think it is 82.", "The answer is 82", "7+5", "carry 1; borrow 1", "; ; answer 82",
              "<|im_end|>", "Sure! Let me add 37 and 45: answer 82"]
    assert not any(is_careful(t) for t in texts)
    assert not any(is_careful(t, "37+45") for t in texts)


@pytest.mark.parametrize("text", [
    "3+4+1=8; 7+5=12 carry 1; answer 82",       # the steps swapped
    "3+4=7; 7+5=12; answer 82",                  # swapped, markers dropped: the tens digits come first
    "7+5=12 carry 1; answer 82",                 # a step missing
    "7+5=12 carry 1; 3+4+1=8",                   # no answer line
    "answer 82; 7+5=12 carry 1; 3+4+1=8",        # the answer first
    "7+5=12 carry 1; 3+4+1=8; answer 82; 1+1=2",  # something after the answer line
    "7+5=12 carry 1; 3+4+1=8; answer 82 answer 82",
    "7+5=12 carry 1, 3+4+1=8, answer 82",        # other separators
    "7+5=12 carry 1;3+4+1=8;answer 82",
    "7 + 5 = 12 carry 1; 3 + 4 + 1 = 8; answer 82",
    "7+5=12; carry 1; 3+4+1=8; answer 82",       # the carry as a step of its own
    "Step 1: 7+5=12 carry 1; 3+4+1=8; answer 82",
    "7-5=2; 3-4=1; answer 12",                   # the other operation's steps
    "1+2=3; 4+5=9; answer 93",                   # another problem's digits
    "7+5=12 carry 1; 3+4+1=8; the answer is 82",
])
def test_careful_format_with_a_wrong_step_is_not_careful(text):
    assert not is_careful(text, "37+45")


def test_careful_means_the_format_not_the_result():
    # a careful answer with a slip is careful (the verifier, not the style, says it is wrong)
    assert is_careful("7+5=11 carry 1; 3+4+1=8; answer 81", "37+45") and not verify("37+45", "answer 81")
    assert is_careful("12-5=7 borrow 1; 8-4=4; answer 47", "82-45")  # a lost borrow, in the careful format
    assert is_careful("  7+5=12 carry 1; 3+4+1=8; answer 82\n", "37+45")  # surrounding whitespace aside
    # the same worked text is checked against its question: subtraction steps for an addition are not
    assert is_careful("12-5=7 borrow 1; 8-1-4=3; answer 37") and not is_careful("12-5=7 borrow 1; 8-1-4=3; answer 37",
                                                                                 "37+45")


def test_careful_share_and_its_n_a():
    questions = ["37+45", "82-45", "37+45", "37+45"]
    responses = [careful_solution(Problem("add", 37, 45)), "answer 37", "3+4=7; 7+5=12; answer 82", "7+5=12 carry"]
    assert careful_share(questions, responses) == 0.25
    assert careful_share(questions, [careful_solution(Problem.parse(q)) for q in questions]) == 1.0
    assert math.isnan(careful_share([], []))  # nothing to tell: not a number
    table = markdown_table({"base": {"eval_id": {"accuracy": 0.0, "careful_rate": float("nan"), "loglik": -2.98},
                                     "eval_ood": {"accuracy": 0.02, "careful_rate": 0.0}},
                            "sft": {"eval_id": {"accuracy": 0.38, "careful_rate": 1.0, "loglik": -0.104},
                                    "eval_ood": {"accuracy": 0.0, "careful_rate": 0.5, "loglik": float("nan")}}})
    rows = table.splitlines()
    assert rows[2] == "| base | 0.000 (careful n/a) | 0.020 (careful 0.00) | -2.9800 | n/a |"
    assert rows[3] == "| SFT | 0.380 (careful 1.00) | 0.000 (careful 0.50) | -0.1040 | n/a |"


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
