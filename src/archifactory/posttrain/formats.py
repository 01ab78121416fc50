"""Instruction-tuning records -> chat messages (``[{"role", "content"}, ...]``), and where records come from.

Formats (``format: auto`` picks one from a record's keys, in this order):

- ``messages``: ``{"messages": [{"role", "content"}, ...]}`` (TRL's conversational format; multi-turn,
  optional leading system message). ShareGPT's ``{"conversations": [{"from", "value"}]}`` is read too
  (``human`` -> user, ``gpt`` -> assistant).
- ``dolphin_r1``: ``{"messages": [...prompt turns], "reasoning", "answer"}`` (cognitivecomputations/
  dolphin-r1): the assistant turn is the answer, preceded by ``<think>reasoning</think>`` when
  ``keep_reasoning`` (the switch "with and without thinking traces").
- ``prompt_completion``: ``{"prompt", "completion"}``, strings (one user turn, one assistant turn) or
  message lists (TRL's conversational prompt-completion).
- ``alpaca``: ``{"instruction", "input", "output"}`` (optional ``system``): the user turn is the
  instruction, then a blank line and the input when there is one.
- ``limo``: ``{"question", "solution", "answer"}`` (GAIR/LIMO): user = question, assistant = solution
  (which ends with the final answer); ``answer`` is not trained on, it stays for answer checking.

Sources: a local ``.json`` (a list of records), ``.jsonl`` or ``.parquet`` file, or a Hugging Face hub
dataset name or local dataset folder (through ``datasets.load_dataset``, with ``subset`` and ``split``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Literal

from archifactory.posttrain.chat import assistant_content, check_messages

Format = Literal["auto", "messages", "dolphin_r1", "prompt_completion", "alpaca", "limo"]
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _messages(record: dict, keep_reasoning: bool) -> list[dict]:
    if "messages" in record:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    else:
        messages = [{"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]} for m in record["conversations"]]
    return messages


def _dolphin_r1(record: dict, keep_reasoning: bool) -> list[dict]:
    prompt = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if prompt and prompt[-1]["role"] == "assistant":
        raise ValueError("dolphin_r1 records hold the prompt in 'messages' and the reply in 'answer'; "
                         "the messages end with an assistant turn")
    reasoning = record.get("reasoning") if keep_reasoning else None
    return prompt + [{"role": "assistant", "content": assistant_content(record["answer"], reasoning or None)}]


def _prompt_completion(record: dict, keep_reasoning: bool) -> list[dict]:
    prompt, completion = record["prompt"], record["completion"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    return prompt + [dict(m) for m in completion]


def _alpaca(record: dict, keep_reasoning: bool) -> list[dict]:
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _limo(record: dict, keep_reasoning: bool) -> list[dict]:
    return [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["solution"]}]


CONVERTERS: dict[str, tuple[tuple[str, ...], Callable[[dict, bool], list[dict]]]] = {
    # format: (keys that identify it, converter); ``auto`` tries them in this order
    "dolphin_r1": (("messages", "answer"), _dolphin_r1),
    "messages": (("messages",), _messages),
    "prompt_completion": (("prompt", "completion"), _prompt_completion),
    "alpaca": (("instruction", "output"), _alpaca),
    "limo": (("question", "solution"), _limo),
}


def detect_format(record: dict) -> str:
    if "conversations" in record:
        return "messages"
    for name, (keys, _) in CONVERTERS.items():
        if all(k in record for k in keys):
            return name
    raise ValueError(
        f"cannot tell the format of a record with keys {sorted(record)}; expected one of: "
        + "; ".join(f"{name} ({', '.join(keys)})" for name, (keys, _) in CONVERTERS.items())
    )


def to_messages(record: dict, format: Format = "auto", keep_reasoning: bool = True) -> list[dict]:
    """One record as chat messages, checked (roles, text content, system first, ends with the assistant)."""
    name = detect_format(record) if format == "auto" else format
    if name not in CONVERTERS:
        raise ValueError(f"unknown format {format!r}; use one of {['auto', *CONVERTERS]}")
    keys, convert = CONVERTERS[name]
    missing = [k for k in keys if k not in record and not (name == "messages" and "conversations" in record)]
    if missing:
        raise ValueError(f"a {name} record needs keys {list(keys)}; this one has {sorted(record)}")
    messages = convert(record, keep_reasoning)
    check_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"a {name} record has no assistant turn to train on")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"a {name} record ends with a {messages[-1]['role']} turn; conversations end with the assistant")
    return messages


def load_records(source: str, split: str = "train", subset: str | None = None, base_dir: Path | None = None) -> list[dict]:
    """Records from a local JSON / JSONL / Parquet file or a hub dataset name. ``base_dir`` resolves a
    relative path (the config file's folder), falling back to the working directory."""
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl", ".parquet"):
        if not path.is_file():
            raise FileNotFoundError(f"SFT data file not found: {path}")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".jsonl":
            return [_json_line(line, path, i) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of records (or use .jsonl, one record per line)")
        return data
    if path.is_file():
        raise ValueError(f"{path}: unknown file type {suffix!r}; give a .json, .jsonl or .parquet file")
    if path.is_dir():
        source = str(path)  # a local dataset folder (data files or a downloaded hub repository)
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{source!r} is not a local file; loading hub datasets needs `pip install datasets`") from None
    try:
        return list(datasets.load_dataset(source, subset, split=split))
    except Exception as err:
        raise RuntimeError(f"could not load dataset {source!r} (subset={subset}, split={split}): {err}") from None


def _json_line(line: str, path: Path, number: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number} is not valid JSON ({err.msg})") from None


def conversations(records: Iterable[dict], format: Format = "auto", keep_reasoning: bool = True) -> list[list[dict]]:
    """Every record as messages; an error names the record's index."""
    out = []
    for i, record in enumerate(records):
        try:
            out.append(to_messages(record, format, keep_reasoning))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"SFT record {i}: {err}") from None
    return out
