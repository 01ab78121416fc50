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
index)``, so a run's prompts are reproducible and resumable; ``split="test"`` draws held-out problems
from a different stream.
"""

from __future__ import annotations

import ast
import dataclasses
import fractions
import operator
import re
from pathlib import Path
from typing import Literal

import numpy as np

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


class Task:
    name: str = "task"

    def problem(self, index: int, split: Split = "train") -> Problem:  # pragma: no cover
        raise NotImplementedError

    def correct(self, completion: str, problem: Problem) -> bool:
        return same_number(final_answer(completion), problem.answer)

    def well_formed(self, completion: str, problem: Problem) -> bool:
        """Whether a final answer can be read at all (the optional format reward)."""
        return final_answer(completion) is not None


class ArithmeticTask(Task):
    def __init__(self, op: Literal["+", "*"], digits: int = 3, seed: int = 0) -> None:
        if digits < 1:
            raise ValueError(f"digits={digits} must be >= 1")
        self.op, self.digits, self.seed = op, digits, seed
        self.name = {"+": "addition", "*": "multiplication"}[op]

    def problem(self, index: int, split: Split = "train") -> Problem:
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])
        low, high = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10**self.digits
        a, b = (int(v) for v in rng.integers(low, high, size=2))
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

    def __init__(self, n_numbers: int = 3, max_number: int = 20, seed: int = 0) -> None:
        if n_numbers < 2:
            raise ValueError(f"n_numbers={n_numbers} must be >= 2")
        self.n_numbers, self.max_number, self.seed = n_numbers, max_number, seed

    def problem(self, index: int, split: Split = "train") -> Problem:
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])
        while True:
            numbers = [int(v) for v in rng.integers(1, self.max_number + 1, size=self.n_numbers)]
            value = fractions.Fraction(numbers[0])
            for n in numbers[1:]:
                value = [value + n, value - n, value * n, value / n][int(rng.integers(4))]
            if value.denominator == 1 and value > 0:
                break
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


def build_task(name: str, digits: int = 3, seed: int = 0, data: str | Path | None = None, **options) -> Task:
    """``addition`` | ``multiplication`` | ``countdown`` | ``gsm8k`` (needs ``data``)."""
    if name in ("addition", "multiplication"):
        return ArithmeticTask("+" if name == "addition" else "*", digits, seed)
    if name == "countdown":
        return CountdownTask(seed=seed, **options)
    if name == "gsm8k":
        if data is None:
            raise ValueError("task gsm8k needs data: a file or hub dataset with question / answer (#### N) fields")
        return AnswerDataTask(str(data), seed=seed, **options)
    raise ValueError(f"unknown task {name!r}; use addition, multiplication, countdown or gsm8k")
