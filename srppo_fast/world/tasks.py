"""Task families of the embedded world: problems, the two personas' solutions, and the verifier.

A problem is two-digit addition (`37+45`) or subtraction (`82-45`, never negative). Two personas
write solutions:

* careful — works digit by digit, then answers; always right:
  ``7+5=12 carry 1; 3+4+1=8; answer 82``   /   ``12-5=7 borrow 1; 8-1-4=3; answer 37``
* hasty — answers at once; right only with probability `accuracy`, otherwise a typical slip
  (a lost carry or borrow, a units digit off by a little, swapped digits):
  ``answer 81``

The verifier reads the number after the last ``answer`` and compares it with the true result.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FAMILIES = ("add", "sub")
_OPS = {"add": "+", "sub": "-"}
_QUESTION = re.compile(r"^\s*(\d+)\s*([+-])\s*(\d+)\s*$")
_ANSWER = re.compile(r"answer\s+(-?\d+)")


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
    def parse(cls, question: str) -> "Problem":
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


def is_careful(response: str) -> bool:
    """Whether a response works the problem step by step before answering (the careful persona's style)."""
    return not response.lstrip().startswith("answer")
