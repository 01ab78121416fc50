"""The project's one chat template, its special tokens, and conversations -> token ids + loss mask.

The template is ChatML (the format of TRL's ``setup_chat_format``, Qwen and SmolLM), written in Jinja2 and
rendered by a sandboxed environment as ``transformers``' ``apply_chat_template`` does::

    <|im_start|>system\\n{system}<|im_end|>\\n        (only when the conversation has a system message)
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n
    ...
    <|im_start|>assistant\\n                         (``add_generation_prompt``: where generation starts)

A reasoning trace, when kept, is part of the assistant's content as ``<think>\\n...\\n</think>\\n\\n``
(DeepSeek-R1 / Qwen3 layout). The four markers are added to the tokenizer as special tokens, so each is one
id that ordinary text can never produce; generation stops at ``<|im_end|>``.

The same :class:`ChatTemplate` renders training conversations and generation prompts, and an SFT run
saves its text as ``chat_template.jinja`` beside ``tokenizer.json``, so both read the same file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from archifactory.data.tokenizer import Tokenizer
from archifactory.errors import InputError
from archifactory.model.lm import CausalLM

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"
CHAT_TOKENS = (IM_START, IM_END, THINK_START, THINK_END)
ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.jinja"

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def assistant_content(answer: str, reasoning: str | None = None) -> str:
    """The assistant's text with an optional thinking trace before the answer."""
    if reasoning is None:
        return answer
    return f"{THINK_START}\n{reasoning.strip()}\n{THINK_END}\n\n{answer}"


@dataclasses.dataclass
class EncodedConversation:
    ids: list[int]
    """Token ids of the rendered conversation."""
    assistant: list[bool]
    """Per token: inside an assistant turn (its content and closing ``<|im_end|>\\n``), i.e. trained on
    with the default assistant-only loss."""


class ChatTemplate:
    """A Jinja2 chat template with the ``transformers`` calling convention (``messages``,
    ``add_generation_prompt``). The text must be prefix-consistent: rendering the first k messages with
    the generation prompt is a prefix of rendering k + 1 (checked per conversation)."""

    def __init__(self, source: str = CHATML_TEMPLATE) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        self._template = env.from_string(source)

    @classmethod
    def load(cls, run_dir: str | Path) -> "ChatTemplate":
        """The template :meth:`save` wrote in ``run_dir``. Raises ``FileNotFoundError`` when there is none
        and :class:`~archifactory.integrity.CorruptFileError` when it does not match its checksum or does
        not parse."""
        from archifactory.integrity import CorruptFileError, verify_sidecar

        path = Path(run_dir) / TEMPLATE_FILE
        if not path.is_file():
            from archifactory.config import load_yaml
            from archifactory.train.locate import train_command

            try:
                stage = load_yaml(Path(run_dir) / "config.yaml").get("stage")
            except Exception:  # no readable run config: not a run of ours
                stage = None
            if stage in ("sft", "grpo"):  # a chat run that lost its template: its setup writes it again
                raise FileNotFoundError(f"{path} is missing; `{train_command(Path(run_dir))}` writes it again")
            raise FileNotFoundError(f"{path} is missing: {run_dir} is not a chat (SFT) run; run `archifactory sft` first")
        try:
            problem = verify_sidecar(path)
            if problem:
                raise ValueError(problem)
            return cls(path.read_text(encoding="utf-8"))
        except Exception as err:  # the checksum, UTF-8 or the Jinja2 parser: the file is damaged
            raise CorruptFileError(f"chat template {path} is damaged ({type(err).__name__}: {err})") from None

    @classmethod
    def readable(cls, path: str | Path) -> bool:
        """Whether :meth:`load` reads the template file ``path`` (there, matching its checksum if it has one,
        and parsing: a run written before templates carried checksums has none, so damage shows as
        unreadable)."""
        from archifactory.integrity import CorruptFileError

        try:
            cls.load(Path(path).parent)
        except (FileNotFoundError, CorruptFileError):
            return False
        return True

    def save(self, run_dir: str | Path) -> Path:
        """Write ``chat_template.jinja`` (and its checksum) in ``run_dir``."""
        from archifactory.integrity import write_sidecar

        path = Path(run_dir) / TEMPLATE_FILE
        path.write_text(self.source, encoding="utf-8")
        write_sidecar(path)
        return path

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        check_messages(messages)
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans ``[start, end)`` of each assistant turn (from after
        the generation prompt to the end of that turn's rendering)."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    "the chat template is not prefix-consistent (rendering a conversation's first turns is not "
                    "a prefix of rendering it whole), so assistant tokens cannot be located"
                )
            spans.append((len(before), len(through)))
        return text, spans

    def encode(self, messages: Sequence[dict], tokenizer: Tokenizer) -> EncodedConversation:
        """Render and tokenize ``messages``; mark the tokens that start inside an assistant span."""
        text, spans = self.assistant_spans(messages)
        if tokenizer.backend is None:
            raise ValueError("chat data needs a tokenizers-backed tokenizer (bpe or hf), not the bytes tokenizer")
        encoding = tokenizer.backend.encode(text, add_special_tokens=False)
        mask = [any(a <= start < b for a, b in spans) for start, _ in encoding.offsets]
        return EncodedConversation(list(encoding.ids), mask)

    def generation_prompt(self, messages: Sequence[dict], tokenizer: Tokenizer) -> list[int]:
        """Token ids of ``messages`` followed by the assistant header, ready for ``CausalLM.generate``."""
        return tokenizer.encode(self.render(messages, add_generation_prompt=True))


def check_messages(messages: Sequence[dict]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {message!r:.120}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {i} has role {message['role']!r}; use one of {list(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} ({message['role']}) has no text content: {message.get('content')!r:.80}")
        if message["role"] == "system" and i != 0:
            raise ValueError(f"message {i} is a system message; only the first message may be one")


# ------------------------------------------------------------------------------------- tokenizer + model


def add_chat_tokens(tokenizer: Tokenizer) -> tuple[Tokenizer, dict[str, int], list[int]]:
    """A copy of ``tokenizer`` with the chat markers as special tokens; returns it, each marker's id, and
    the ids that are new. Markers the tokenizer already has keep their id; new ones take the ids after its
    vocabulary, so no existing id changes meaning."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    if tokenizer.backend is None:
        raise ValueError("the bytes tokenizer cannot take chat tokens; pretrain with a bpe or hf tokenizer for SFT")
    backend = HFTokenizer.from_str(tokenizer.backend.to_str())
    missing = [t for t in CHAT_TOKENS if backend.token_to_id(t) is None]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    ids = {t: backend.token_to_id(t) for t in CHAT_TOKENS}
    return Tokenizer(backend, tokenizer.eos_id, tokenizer.name), ids, [ids[t] for t in missing]


def resize_vocab(model: CausalLM, vocab_size: int, new_ids: Sequence[int]) -> CausalLM:
    """``model`` with ``vocab_size`` rows in its embedding and head. Rows of ``new_ids`` (and rows added at
    the end) start at the mean of the other rows, so the output distribution barely moves (Hewitt 2021;
    ``transformers``' ``resize_token_embeddings(mean_resizing=True)`` samples around that mean instead).
    Every other parameter, and every other row, is copied unchanged."""
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"vocab_size={vocab_size} would drop rows of the model's {old}-row embedding")
    config = model.config.model_copy(update={"vocab_size": vocab_size})
    resized = config.build().to(device=model.embed.weight.device, dtype=model.embed.weight.dtype)
    state = model.state_dict()
    fresh = sorted({int(i) for i in new_ids} | set(range(old, vocab_size)))
    kept = torch.ones(vocab_size, dtype=torch.bool)
    kept[fresh] = False
    with torch.no_grad():
        for name, target in resized.state_dict().items():
            source = state[name]
            if source.shape == target.shape:
                target.copy_(source)
                continue
            if source.shape[0] != old or source.shape[1:] != target.shape[1:]:
                raise ValueError(f"cannot resize {name} from {tuple(source.shape)} to {tuple(target.shape)}")
            target[:old].copy_(source)
            target[~kept] = source[kept[:old]].mean(dim=0).to(target.dtype)
    return resized


def chat_reply(
    model: CausalLM,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    messages: Sequence[dict],
    max_new_tokens: int = 200,
    **sampling,
) -> str:
    """The assistant's next turn for ``messages``, rendered and decoded with ``template``; sampling
    options go to :meth:`CausalLM.generate`. Decoding stops at ``<|im_end|>``."""
    end = tokenizer.backend.token_to_id(IM_END) if tokenizer.backend is not None else None
    if end is None:
        raise InputError(f"the tokenizer has no {IM_END} token, so it cannot read a chat: give an SFT run "
                         "(archifactory sft) or its tokenizer")
    prompt = template.generation_prompt(messages, tokenizer)
    out = model.generate(prompt, max_new_tokens, eos_token_id=end, **sampling)[len(prompt):].tolist()
    if end in out:
        out = out[: out.index(end)]
    return tokenizer.decode(out)
