"""Task families of the embedded world: problems, the two personas' solutions, and the verifier.

A problem is two-digit addition (`37+45`) or subtraction (`82-45`, never negative). Two personas
write solutions:

* careful — works digit by digit, then answers; always right:
  ``7+5=12 carry 1; 3+4+1=8; answer 82``   /   ``12-5=7 borrow 1; 8-1-4=3; answer 37``
* hasty — answers at once; right only with probability `accuracy`, otherwise a typical slip
  (a lost carry or borrow, a units digit off by a little, swapped digits):
  ``answer 81``

The verifier reads the number after the last ``answer`` and compares it with the true result.

A response is *careful* (`is_careful`, the careful share) when it is the careful persona's worked format:
the units step (``u+u=s``, ``carry 1`` after it when it carries; ``u-u=d``, or ``1u-u=d borrow 1``), then
the tens step (``t+t=s`` or ``t+t+1=s``; ``t-t=d`` or ``t-1-t=d``), then the answer line ``answer N``,
separated by ``; `` and nothing after it. Given the question, the steps must also work its digits: units
first, then tens. The arithmetic inside the steps is not checked (a careful answer with a slip is still
careful; the verifier judges the result), so neither a bare ``answer N`` nor text that only fails to start
with ``answer`` counts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FAMILIES = ("add", "sub")
_OPS = {"add": "+", "sub": "-"}
_QUESTION = re.compile(r"^\s*(\d+)\s*([+-])\s*(\d+)\s*$")
_ANSWER = re.compile(r"answer\s+(-?\d+)")
# the careful persona's worked format (careful_solution): the units step; the tens step; the answer line
_CAREFUL = {
    "add": re.compile(r"(\d)\+(\d)=\d+(?: carry 1)?; (\d)\+(\d)(?:\+1)?=\d+; answer \d+"),
    "sub": re.compile(r"(1?\d)-(\d)=\d+(?: borrow 1)?; (\d)(?:-1)?-(\d)=\d+; answer \d+"),
}


@dataclass(frozen=True)
class Problem:
    family: str
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"{self.a}{_OPS[self.family]}{self.b}"

    @property
    def result(self) -> int:
        return self.a + self.b if self.family == "add" else self.a - self.b

    @classmethod
    def parse(cls, question: str) -> Problem:
        m = _QUESTION.match(question)
        if m is None:
            raise ValueError(f"not a world question: {question!r}")
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return cls("add" if op == "+" else "sub", a, b)


def all_problems(family: str) -> list[Problem]:
    """Every problem of a family: operands 10..99, subtraction with a >= b."""
    if family == "add":
        return [Problem("add", a, b) for a in range(10, 100) for b in range(10, 100)]
    if family == "sub":
        return [Problem("sub", a, b) for a in range(10, 100) for b in range(10, a + 1)]
    raise ValueError(f"unknown family {family!r}")


def careful_solution(p: Problem) -> str:
    ta, ua, tb, ub = p.a // 10, p.a % 10, p.b // 10, p.b % 10
    if p.family == "add":
        s1 = ua + ub
        carry = s1 // 10
        first = f"{ua}+{ub}={s1}" + (f" carry {carry}" if carry else "")
        second = f"{ta}+{tb}" + (f"+{carry}" if carry else "") + f"={ta + tb + carry}"
    else:
        if ua < ub:
            first = f"{ua + 10}-{ub}={ua + 10 - ub} borrow 1"
            second = f"{ta}-1-{tb}={ta - 1 - tb}"
        else:
            first = f"{ua}-{ub}={ua - ub}"
            second = f"{ta}-{tb}={ta - tb}"
    return f"{first}; {second}; answer {p.result}"


def slip(p: Problem, rng: random.Random) -> int:
    """A typical wrong answer: a lost/extra carry or borrow, units off by 1-3, or swapped digits."""
    r = p.result
    for _ in range(20):
        kind = rng.randrange(3)
        if kind == 0:
            wrong = r + rng.choice((-10, 10))
        elif kind == 1:
            wrong = r + rng.choice((-3, -2, -1, 1, 2, 3))
        else:
            digits = str(r)
            wrong = int(digits[::-1]) if len(digits) > 1 else r + 1
        if wrong != r and wrong >= 0:
            return wrong
    return r + 1


def hasty_solution(p: Problem, rng: random.Random, accuracy: float) -> str:
    value = p.result if rng.random() < accuracy else slip(p, rng)
    return f"answer {value}"


def parse_answer(response: str) -> int | None:
    found = _ANSWER.findall(response)
    return int(found[-1]) if found else None


def verify(question: str, response: str) -> bool:
    """True when the response's final `answer N` is the problem's result."""
    return parse_answer(response) == Problem.parse(question).result


def is_careful(response: str, question: str | None = None) -> bool:
    """Whether `response` is the careful persona's worked format (module doc): its two steps in order, then
    the answer line and nothing else (surrounding whitespace aside). With `question`, the steps must be that
    problem's: its operation, the units digits first (the minuend's plus 10 after a borrow), then the tens."""
    text = response.strip()
    if question is None:
        return any(_CAREFUL[family].fullmatch(text) for family in FAMILIES)
    p = Problem.parse(question)
    m = _CAREFUL[p.family].fullmatch(text)
    if m is None:
        return False
    units_a, units_b, tens_a, tens_b = (int(g) for g in m.groups())
    minuend_units = {p.a % 10, p.a % 10 + 10} if p.family == "sub" else {p.a % 10}
    return units_a in minuend_units and units_b == p.b % 10 and (tens_a, tens_b) == (p.a // 10, p.b // 10)


def careful_share(questions: list[str], responses: list[str]) -> float:
    """The share of `responses` in the careful persona's worked format (is_careful, each checked against its
    question); NaN, shown as n/a, when there is no response to tell it of."""
    if not responses:
        return float("nan")
    return sum(is_careful(r, q) for q, r in zip(questions, responses)) / len(responses)
