"""Verifiable tasks for GRPO: generated problems with exact checkers, and user data with a final-answer
extractor.

- ``addition`` / ``multiplication``: two random ``digits``-digit numbers; reward 1 when the completion's
  final answer is the exact result.
- ``countdown``: reach ``target`` with the given numbers, each used exactly once, with + - * / and
  parentheses (the TinyZero / Countdown rule); the expression is read from ``<answer>...</answer>`` (or
  the last line) and evaluated exactly with fractions, never with ``eval``.
- ``gsm8k``: records with a question and a reference answer after ``####`` (GSM8K's layout); reward 1 when
  the completion's final answer equals it as a number.

A completion's final answer is the text after its last ``####`` or ``Answer:`` when present, else its last
number; any ``<think>...</think>`` trace is ignored. Problems are a pure function of ``(seed, split,
index)``, so a run's prompts are reproducible and resumable. ``split="test"`` draws held-out problems that
``split="train"`` never gives: for the generated tasks a seeded share ``test_fraction`` of all problems
(a hash of the seed and the problem: the operand pair, or the numbers and target) belongs to the test
split only, so held-out accuracy is measured on problems never trained on even where the problem space is
small (1-digit addition has 100); for records, a seeded share of the records.
"""

from __future__ import annotations

import ast
import dataclasses
import fractions
import hashlib
import operator
import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from archifactory.config import Seed, Strict
from archifactory.posttrain.chat import THINK_END


Split = Literal["train", "test"]
SPLIT_IDS = {"train": 0, "test": 1}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclasses.dataclass
class Problem:
    prompt: str
    """The user message."""
    answer: str
    """The reference answer (for countdown: the target)."""
    numbers: tuple[int, ...] = ()
    """Countdown: the numbers to use."""


def strip_thinking(completion: str) -> str:
    return completion.split(THINK_END)[-1] if THINK_END in completion else completion


def final_answer(completion: str) -> str | None:
    """The text after the last ``####`` / ``Answer:`` marker (its first number when it has one), else the
    last number of the completion; ``None`` when there is none."""
    text = strip_thinking(completion)
    for marker in ("####", "Answer:", "answer:"):
        if marker in text:
            tail = text.rsplit(marker, 1)[1].strip()
            match = NUMBER.search(tail)
            return match.group(0) if match else (tail.splitlines()[0].strip() if tail else None)
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def same_number(a: str | None, b: str) -> bool:
    """Exact numeric equality (``1,234`` == ``1234.0``); falls back to string equality."""
    if a is None:
        return False
    try:
        return fractions.Fraction(a.replace(",", "")) == fractions.Fraction(b.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return a.strip() == b.strip()


MAX_DRAWS = 10_000


def held_out(seed: int, key: str, test_fraction: float) -> bool:
    """Whether the problem ``key`` belongs to the test split: a hash of ``(seed, key)`` below
    ``test_fraction`` (a fixed, seeded share of all problems)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < test_fraction


def check_test_fraction(test_fraction: float) -> None:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1): the share of problems held out for testing")


class Task:
    name: str = "task"
    seed: int = 0
    test_fraction: float = 0.1

    def draw_split(self, rng: np.random.Generator, split: Split, draw) -> tuple:
        """Draws ``draw(rng) -> (key, value)`` until the key falls in ``split``; returns the value."""
        want = split == "test"
        for _ in range(MAX_DRAWS):
            key, value = draw(rng)
            if held_out(self.seed, key, self.test_fraction) == want:
                return value
        raise ValueError(f"{self.name}: no {split} problem in {MAX_DRAWS} draws; the problem space is too small "
                         f"for test_fraction={self.test_fraction} (raise digits or max_number, or change test_fraction)")

    def problem(self, index: int, split: Split = "train") -> Problem:  # pragma: no cover
        raise NotImplementedError

    def correct(self, completion: str, problem: Problem) -> bool:
        return same_number(final_answer(completion), problem.answer)

    def well_formed(self, completion: str, problem: Problem) -> bool:
        """Whether a final answer can be read at all (the optional format reward)."""
        return final_answer(completion) is not None


class ArithmeticTask(Task):
    """Two random ``digits``-digit operands (1 digit: 0-9); the ordered pair decides the split."""

    def __init__(self, op: Literal["+", "*"], digits: int = 3, seed: int = 0, test_fraction: float = 0.1) -> None:
        if digits < 1:
            raise ValueError(f"digits={digits} must be >= 1")
        check_test_fraction(test_fraction)
        self.op, self.digits, self.seed, self.test_fraction = op, digits, seed, test_fraction
        self.name = {"+": "addition", "*": "multiplication"}[op]

    def problem(self, index: int, split: Split = "train") -> Problem:
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])
        low, high = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10**self.digits

        def draw(rng):
            a, b = (int(v) for v in rng.integers(low, high, size=2))
            return f"{a}{self.op}{b}", (a, b)

        a, b = self.draw_split(rng, split, draw)
        result = a + b if self.op == "+" else a * b
        return Problem(f"What is {a} {self.op} {b}?", str(result))


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate_expression(text: str) -> tuple[fractions.Fraction, list[int]]:
    """Exact value of an arithmetic expression of integers with + - * / and parentheses, and the integers
    it uses. Raises ``ValueError`` for anything else (names, calls, powers, division by zero)."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an expression: {text!r:.60}") from None
    used: list[int] = []

    def walk(node) -> fractions.Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return fractions.Fraction(node.value)
        raise ValueError(f"only integers, + - * / and parentheses are allowed, not {type(node).__name__}")

    return walk(tree), used


class CountdownTask(Task):
    """``n_numbers`` numbers in ``[1, max_number]``; the target is the value of a random expression that
    uses each exactly once (so every problem has a solution) and is a positive integer."""

    name = "countdown"

    def __init__(self, n_numbers: int = 3, max_number: int = 20, seed: int = 0, test_fraction: float = 0.1) -> None:
        if n_numbers < 2:
            raise ValueError(f"n_numbers={n_numbers} must be >= 2")
        check_test_fraction(test_fraction)
        self.n_numbers, self.max_number, self.seed, self.test_fraction = n_numbers, max_number, seed, test_fraction

    def problem(self, index: int, split: Split = "train") -> Problem:
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])

        def draw(rng):  # the multiset of numbers and the target decide the split
            while True:
                numbers = [int(v) for v in rng.integers(1, self.max_number + 1, size=self.n_numbers)]
                value = fractions.Fraction(numbers[0])
                for n in numbers[1:]:
                    value = [value + n, value - n, value * n, value / n][int(rng.integers(4))]
                if value.denominator == 1 and value > 0:
                    return f"{sorted(numbers)}={value}", (numbers, value)

        numbers, value = self.draw_split(rng, split, draw)
        shown = [int(v) for v in rng.permutation(numbers)]
        prompt = (f"Using the numbers {shown}, each exactly once, and + - * / with parentheses, write an "
                  f"expression equal to {int(value)}. Put it in <answer></answer>.")
        return Problem(prompt, str(int(value)), tuple(shown))

    @staticmethod
    def expression(completion: str) -> str | None:
        text = strip_thinking(completion)
        found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
        if found:
            return found[-1].split("=")[0]
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return lines[-1].split("=")[0] if lines else None

    def correct(self, completion: str, problem: Problem) -> bool:
        expression = self.expression(completion)
        if expression is None:
            return False
        try:
            value, used = evaluate_expression(expression)
        except ValueError:
            return False
        return sorted(used) == sorted(problem.numbers) and value == int(problem.answer)

    def well_formed(self, completion: str, problem: Problem) -> bool:
        expression = self.expression(completion)
        try:
            return expression is not None and evaluate_expression(expression) is not None
        except ValueError:
            return False


class AnswerDataTask(Task):
    """User records with a question and a reference answer after ``####`` (GSM8K): ``question_field`` and
    ``answer_field``; ``test_fraction`` of the records (a seeded draw) are held out."""

    name = "gsm8k"

    def __init__(self, source: str, question_field: str = "question", answer_field: str = "answer",
                 test_fraction: float = 0.1, seed: int = 0, split: str = "train", subset: str | None = None) -> None:
        from archifactory.posttrain.formats import load_records

        records = load_records(source, split, subset)
        problems = []
        for i, record in enumerate(records):
            if question_field not in record or answer_field not in record:
                raise ValueError(f"{source} record {i} lacks {question_field!r} or {answer_field!r}: {sorted(record)}")
            reference = str(record[answer_field])
            reference = reference.rsplit("####", 1)[1].strip() if "####" in reference else reference.strip()
            problems.append(Problem(str(record[question_field]), reference.replace(",", "")))
        if len(problems) < 2:
            raise ValueError(f"{source} holds {len(problems)} usable records; need at least 2 (train and test)")
        order = np.random.default_rng([seed, 2]).permutation(len(problems))
        n_test = max(1, round(test_fraction * len(problems)))
        self.splits = {"test": [problems[i] for i in order[:n_test]], "train": [problems[i] for i in order[n_test:]]}
        self.seed = seed

    def problem(self, index: int, split: Split = "train") -> Problem:
        problems = self.splits[split]
        if split == "test":
            return problems[index % len(problems)]
        epoch, position = divmod(index, len(problems))
        return problems[int(np.random.default_rng([self.seed, 3, epoch]).permutation(len(problems))[position])]


def build_task(name: str, digits: int = 3, seed: int = 0, data: str | Path | None = None, test_fraction: float = 0.1,
               **options) -> Task:
    """``addition`` | ``multiplication`` | ``countdown`` | ``gsm8k`` (needs ``data``); ``test_fraction`` of
    the problems (records) are held out for ``split="test"``."""
    check_test_fraction(test_fraction)
    if name in ("addition", "multiplication"):
        return ArithmeticTask("+" if name == "addition" else "*", digits, seed, test_fraction)
    if name == "countdown":
        return CountdownTask(seed=seed, test_fraction=test_fraction, **options)
    if name == "gsm8k":
        if data is None:
            raise ValueError("task gsm8k needs data: a file or hub dataset with question / answer (#### N) fields")
        return AnswerDataTask(str(data), seed=seed, test_fraction=test_fraction, **options)
    raise ValueError(f"unknown task {name!r}; use addition, multiplication, countdown or gsm8k")


class TaskConfig(Strict):
    """A task as a run config names it (a GRPO run's ``task``, an SFT run's ``data.task``)."""

    name: Literal["addition", "multiplication", "countdown", "gsm8k"] = "addition"
    digits: int = Field(3, ge=1, le=30)
    """addition / multiplication: digits of each operand (1: 0-9)."""
    n_numbers: int = Field(3, ge=2, le=6)
    """countdown: numbers to combine."""
    max_number: int = Field(20, ge=1)
    """countdown: the numbers are drawn from 1..max_number."""
    data: str | None = None
    """gsm8k: a local file or hub dataset with ``question`` and ``answer`` (``#### N``) fields."""
    seed: Seed = 0
    """Problem stream and the choice of held-out problems."""
    test_fraction: float = Field(0.1, gt=0, le=0.5)
    """Share of the problems (operand pairs, countdown numbers and target, or records) held out: the
    held-out accuracy is measured on them only, and training never draws them."""

    @model_validator(mode="after")
    def _both_splits_draw(self):
        if self.name != "gsm8k":  # a generated task: both splits must hold a problem (tiny spaces may not)
            built = self.build()
            for split in ("train", "test"):
                built.problem(0, split)  # ValueError naming test_fraction when the split is empty
        return self

    def build(self) -> Task:
        options = {"countdown": {"n_numbers": self.n_numbers, "max_number": self.max_number}}.get(self.name, {})
        return build_task(self.name, digits=self.digits, seed=self.seed, data=self.data,
                          test_fraction=self.test_fraction, **options)
