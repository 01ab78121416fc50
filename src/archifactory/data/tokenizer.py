"""Tokenizers, all through Hugging Face ``tokenizers``:

- ``bpe``: a byte-level BPE trained on the corpus's training split, cached by (corpus, settings);
- ``hf``: a named hub tokenizer or a local ``tokenizer.json`` / tokenizer directory;
- ``bytes``: raw UTF-8 bytes (ids 0-255) plus an end-of-document id 256.

Every tokenizer appends one end-of-document id after each document when shards are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
from pydantic import Field

from archifactory.config import Component
from archifactory.errors import ArchifactoryWarning, InputError, UnavailableError
from archifactory.integrity import CorruptFileError, verify_sidecar, write_sidecar
from archifactory.registry import register_tokenizer

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    """A trained or loaded tokenizer: batch encoding (with the bytes each token covers) and decoding."""

    def __init__(self, backend, eos_id: int, name: str) -> None:
        if backend is not None:  # a tokenizer.json may carry settings that would cut or pad documents
            backend.no_truncation()
            backend.no_padding()
        self.backend = backend  # tokenizers.Tokenizer, or None for bytes
        self.eos_id = eos_id
        self.name = name

    @property
    def vocab_size(self) -> int:
        return 257 if self.backend is None else self.backend.get_vocab_size()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.backend is None:
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.backend is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.backend.decode(ids, skip_special_tokens=False)

    def encode_batch_with_bytes(self, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
        """Token ids of each text and, per token, the UTF-8 bytes of the text it stands for, counted from the
        token's span in the text (the tokenizer's offsets), never by decoding the token alone: a lone
        SentencePiece piece decodes without its word-initial space and a lone byte-fallback piece to
        U+FFFD (3 bytes for 1). See :func:`span_bytes` for how the bytes are shared out; each text's
        counts sum to its UTF-8 length minus :func:`trailing_bytes` (the end-of-document id's share).
        """
        if self.backend is None:
            return [(list(raw), np.ones(len(raw), dtype=np.int64)) for raw in (t.encode("utf-8") for t in texts)]
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, span_bytes(text, e.offsets)) for text, e in zip(texts, encodings)]

    def fingerprint(self) -> str:
        text = "bytes-v1" if self.backend is None else self.backend.to_str()
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write the tokenizer, with its size and digest in ``<path>.checksum`` (checked by :meth:`load`)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        if self.backend is None:
            tmp.write_text(json.dumps({"kind": "bytes"}))
        else:
            self.backend.save(str(tmp))
        tmp.replace(path)
        write_sidecar(path)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load what :meth:`save` wrote (a tokenizers JSON file, or the bytes marker). Raises
        :class:`CorruptFileError` when the file does not match its checksum or cannot be parsed."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        problem = verify_sidecar(path)
        try:
            if problem:
                raise ValueError(problem)
            text = path.read_text(encoding="utf-8")
            if json.loads(text).get("kind") == "bytes":
                return cls(None, 256, "bytes")
            backend = HFTokenizer.from_str(text)
        except Exception as err:  # UTF-8, JSON or the tokenizers parser: the file is damaged
            raise CorruptFileError(f"tokenizer file {path} is damaged ({type(err).__name__}: {err})") from None
        return cls(backend, _eos_id(backend, path), path.stem)


def _eos_id(backend, where) -> int:
    for candidate in (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>"):
        i = backend.token_to_id(candidate)
        if i is not None:
            return i
    raise InputError(f"tokenizer {where} has no end-of-document token (looked for {EOS_TOKEN!r}, '</s>', '<eos>')")


def utf8_positions(text: str) -> np.ndarray:
    """Byte offset of each character boundary of ``text`` in its UTF-8 encoding: ``out[i]`` is the byte
    where character ``i`` starts (``out[len(text)]`` is the text's UTF-8 length); shape (len(text) + 1,)."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)  # RFC 3629, table 3.6
    return np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])


def span_bytes(text: str, offsets) -> np.ndarray:
    """UTF-8 bytes of ``text`` each token covers, from the tokens' character ``offsets`` (start, end).

    Each byte is counted once, for the last token whose span holds it: token ``i`` owns the bytes from
    the previous token's boundary up to where a later token starts (its own end, for the last token).
    So when several tokens spell one character (byte-level BPE, or byte fallback writing a 3-byte
    character as three ``<0xXX>`` pieces that all carry the character's span) the piece that completes
    it gets its 3 bytes, a SentencePiece ``▁`` inserted before a document's first word (whose span the
    tokenizer aligns with that word's first character) gets none, and text between spans (whitespace a
    pre-tokenizer dropped) goes to the token before it. Returns int64, shape (len(offsets),), summing
    to the end of the furthest span.
    """
    if not len(offsets):
        return np.zeros(0, dtype=np.int64)
    positions = utf8_positions(text)
    spans = positions[np.asarray(offsets, dtype=np.int64)]  # (n, 2) byte offsets
    later_start = np.minimum.accumulate(spans[::-1, 0])[::-1]  # min start of tokens i.., per i
    boundary = np.append(later_start[1:], spans[:, 1].max())  # where token i's bytes end
    return np.diff(boundary, prepend=0)


def trailing_bytes(text: str, counts: np.ndarray) -> int:
    """Bytes at the end of ``text`` that no token covers (e.g. trailing spaces a pre-tokenizer dropped):
    the end-of-document id after the text is counted for them, so a document's bytes sum to its
    UTF-8 length."""
    return len(text.encode("utf-8")) - int(counts.sum())


class TokenizerConfig(Component):
    def load_or_train(self, corpus, cache_dir: Path, vocab_size: int) -> Tokenizer:  # pragma: no cover
        raise NotImplementedError

    def cache_key(self, corpus) -> str:
        return hashlib.sha256(
            json.dumps({"tok": self.model_dump(mode="json"), "corpus": corpus.cache_key()}, sort_keys=True).encode()
        ).hexdigest()[:16]


@register_tokenizer
class BPETokenizerConfig(TokenizerConfig):
    """Byte-level BPE (as GPT-2) trained with Hugging Face ``tokenizers`` on the training split."""

    kind: Literal["bpe"] = "bpe"
    vocab_size: int | None = Field(None, ge=258)
    """``None``: the model's ``vocab_size``."""
    min_frequency: int = Field(2, ge=1)
    max_train_documents: int | None = Field(None, ge=1)
    """Train the merges on at most this many training documents (the whole split by default)."""

    def load_or_train(self, corpus, cache_dir: Path, vocab_size: int) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        size = self.vocab_size or vocab_size
        path = Path(cache_dir) / "tokenizers" / f"bpe-{size}-{self.cache_key(corpus)}.json"
        if path.is_file():
            try:
                return Tokenizer.load(path)
            except CorruptFileError as err:  # a cache entry: train it again
                warnings.warn(f"{err}; training it again", ArchifactoryWarning, stacklevel=2)
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=size,
            min_frequency=self.min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(_limit(corpus.split("train"), self.max_train_documents), trainer=trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        backend.save(str(tmp))
        tmp.replace(path)  # several processes may train the same tokenizer at once: each writes whole
        write_sidecar(path)
        return Tokenizer.load(path)


@register_tokenizer
class HFTokenizerConfig(TokenizerConfig):
    """A pretrained tokenizer: a local ``tokenizer.json`` file or directory, or a hub name."""

    kind: Literal["hf"] = "hf"
    name_or_path: str

    def load_or_train(self, corpus, cache_dir: Path, vocab_size: int) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(self.name_or_path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if path.suffix == ".json":
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {path}")
            try:
                backend = HFTokenizer.from_file(str(path))
            except Exception as err:  # the tokenizers parser raises a bare Exception
                raise CorruptFileError(f"tokenizer file {path} cannot be read ({err}); replace it with a "
                                       "complete Hugging Face tokenizer.json") from None
        else:
            try:
                backend = HFTokenizer.from_pretrained(self.name_or_path)
            except Exception as err:
                raise UnavailableError(
                    f"could not load tokenizer {self.name_or_path!r} from the hub ({err}); "
                    "give a local tokenizer.json path instead"
                ) from None
        return Tokenizer(backend, _eos_id(backend, self.name_or_path), self.name_or_path)


@register_tokenizer
class ByteTokenizerConfig(TokenizerConfig):
    """UTF-8 bytes: ids 0-255, end of document 256 (vocabulary 257)."""

    kind: Literal["bytes"] = "bytes"

    def load_or_train(self, corpus, cache_dir: Path, vocab_size: int) -> Tokenizer:
        return Tokenizer(None, 256, "bytes")


def _limit(docs: Iterator[str], n: int | None) -> Iterator[str]:
    for i, doc in enumerate(docs):
        if n is not None and i >= n:
            return
        yield doc
