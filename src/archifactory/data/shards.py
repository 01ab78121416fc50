"""Token shards: each split's documents encoded in batches and written as one flat memmap of token ids
(uint16 when the vocabulary fits, else uint32), an end-of-document id after every document, with a
manifest (corpus fingerprint, tokenizer hash, counts). A second run with the same corpus and tokenizer
reuses them after checking every file against the manifest (each file's size and XXH3 digest;
the manifest carries a digest of itself): a damaged cache entry (truncated or garbled shard, damaged
manifest) is reported and rebuilt from the corpus, never read.

Beside each split's tokens, ``SPLIT_bytes.bin`` (uint32, one per token) holds the UTF-8 bytes of the text
each token covers, counted from the token's span in the document (:meth:`Tokenizer.encode_batch_with_bytes`);
bits per byte divides by these. The end-of-document id covers no text (0 bytes, or the trailing bytes
no token covered), so the counts of a split sum to its UTF-8 length (``manifest.splits.SPLIT.bytes``)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from archifactory.data.tokenizer import Tokenizer, trailing_bytes
from archifactory.errors import ArchifactoryWarning, InputError
from archifactory.integrity import bytes_digest, file_digest, mismatch

MANIFEST_VERSION = 3  # 2: per-token byte counts (SPLIT_bytes.bin); 3: file sizes and digests
ENCODE_BATCH = 256
BYTES_DTYPE = np.uint32


@dataclasses.dataclass
class ShardSet:
    directory: Path
    manifest: dict

    def tokens(self, split: str) -> np.ndarray:
        info = self.manifest["splits"][split]
        if info["tokens"] == 0:
            return np.zeros(0, dtype=self.manifest["dtype"])
        path = self.directory / f"{split}.bin"
        expected = info["tokens"] * np.dtype(self.manifest["dtype"]).itemsize
        if path.stat().st_size != expected:  # cheap, every time: a shard changed since it was checked
            raise ValueError(f"token shard {path} has {path.stat().st_size:,} bytes, its manifest says {expected:,}; "
                             f"delete {self.directory} to rebuild it")
        return np.memmap(path, dtype=self.manifest["dtype"], mode="r")

    def token_bytes(self, split: str) -> np.ndarray:
        """UTF-8 bytes of text each token of ``split`` covers, aligned with :meth:`tokens` (uint32)."""
        if self.manifest["splits"][split]["tokens"] == 0:
            return np.zeros(0, dtype=BYTES_DTYPE)
        return np.memmap(self.directory / f"{split}_bytes.bin", dtype=BYTES_DTYPE, mode="r")

    def doc_starts(self, split: str) -> np.ndarray:
        return np.load(self.directory / f"{split}_doc_starts.npy")

    @property
    def fingerprint(self) -> str:
        """Identifies the exact token stream: corpus content and tokenizer."""
        return self.manifest["key"]


def shard_key(corpus, tokenizer: Tokenizer) -> str:
    return hashlib.sha256(f"{corpus.cache_key()}:{tokenizer.fingerprint()}:{MANIFEST_VERSION}".encode()).hexdigest()[:16]


def build_shards(
    corpus,
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    progress: Callable[[str, int, int], None] | None = None,
) -> ShardSet:
    """Encode ``corpus``'s train and validation splits with ``tokenizer`` into ``cache_dir/shards/KEY``,
    or return the shards already there."""
    key = shard_key(corpus, tokenizer)
    directory = Path(cache_dir) / "shards" / key
    if directory.exists():
        try:
            return ShardSet(directory, read_manifest(directory, key))
        except DamagedShardsError as err:  # rebuild from the corpus; keep the damaged entry aside
            warnings.warn(f"{err}; rebuilding it from the corpus", ArchifactoryWarning, stacklevel=2)
            aside = directory.with_name(f"{key}.damaged-{os.getpid()}")
            with contextlib.suppress(OSError):
                directory.rename(aside)
                shutil.rmtree(aside, ignore_errors=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    tmp = directory.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.time()
    splits = {}
    content = hashlib.sha256()
    for split in ("train", "val"):
        splits[split] = _write_split(corpus.split(split), tokenizer, tmp, split, dtype, content, progress)
    if splits["train"]["tokens"] < 2:
        shutil.rmtree(tmp)
        raise InputError(f"corpus {corpus.kind!r} gave no training text: check its paths and val_fraction")
    manifest = {
        "version": MANIFEST_VERSION,
        "key": key,
        "corpus": corpus.model_dump(mode="json"),
        "corpus_fingerprint": content.hexdigest()[:16],
        "tokenizer": tokenizer.name,
        "tokenizer_hash": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": np.dtype(dtype).name,
        "splits": splits,
        "build_seconds": round(time.time() - start, 2),
    }
    manifest["manifest_digest"] = _manifest_digest(manifest)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        tmp.rename(directory)  # atomic: a killed build leaves only a tmp directory behind
    except OSError:
        shutil.rmtree(tmp)  # another process finished the same shards first
    return ShardSet(directory, read_manifest(directory, key))


class DamagedShardsError(ValueError):
    """A shard cache entry does not match its manifest, or the manifest is damaged."""


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_digest"}
    return bytes_digest(json.dumps(body, sort_keys=True).encode())


def read_manifest(directory: Path, key: str | None = None) -> dict:
    """The manifest of shard directory ``directory``, after checking it (its own digest, version, key)
    and every file it lists (size, then digest); raises :class:`DamagedShardsError` naming what is wrong."""
    where = f"token shard cache entry {directory}"
    try:
        manifest = json.loads((directory / "manifest.json").read_bytes())
        if not isinstance(manifest, dict) or manifest.get("manifest_digest") != _manifest_digest(manifest):
            raise ValueError("its digest does not match")
    except FileNotFoundError:
        raise DamagedShardsError(f"{where} has no manifest.json") from None
    except ValueError as err:  # JSON or UTF-8 damage, or a changed field
        raise DamagedShardsError(f"{where}: manifest.json is damaged ({err})") from None
    if manifest.get("version") != MANIFEST_VERSION or (key is not None and manifest.get("key") != key):
        raise DamagedShardsError(f"{where} was written by another version")
    for split, info in manifest["splits"].items():
        for name, expected in info["files"].items():
            problem = mismatch(directory / name, expected)
            if problem:
                raise DamagedShardsError(f"{where}: {problem}")
    return manifest


def _write_split(docs: Iterator[str], tokenizer: Tokenizer, directory: Path, split: str, dtype, content, progress):
    n_tokens = n_docs = n_bytes = 0
    starts: list[int] = []
    with open(directory / f"{split}.bin", "wb") as out, open(directory / f"{split}_bytes.bin", "wb") as out_bytes:
        batch: list[str] = []

        def flush():
            nonlocal n_tokens, n_docs, n_bytes
            for text, (ids, counts) in zip(batch, tokenizer.encode_batch_with_bytes(batch)):
                starts.append(n_tokens)
                ids = [*ids, tokenizer.eos_id]
                counts = np.append(counts, trailing_bytes(text, counts))
                doc_bytes = len(text.encode("utf-8"))
                if counts[-1] < 0:  # offsets past the end of the text
                    raise RuntimeError(f"tokenizer {tokenizer.name}: token spans reach past the end of {split} "
                                       f"document {len(starts) - 1} ({doc_bytes} bytes); its offsets are inconsistent")
                np.asarray(ids, dtype=dtype).tofile(out)
                counts.astype(BYTES_DTYPE).tofile(out_bytes)
                n_tokens += len(ids)
                n_bytes += doc_bytes
                content.update(hashlib.sha1(text.encode()).digest())
            n_docs += len(batch)
            batch.clear()
            if progress is not None:
                progress(split, n_docs, n_tokens)

        for doc in docs:
            batch.append(doc)
            if len(batch) >= ENCODE_BATCH:
                flush()
        if batch:
            flush()
    np.save(directory / f"{split}_doc_starts.npy", np.asarray(starts, dtype=np.int64))
    files = {name: file_digest(directory / name)
             for name in (f"{split}.bin", f"{split}_bytes.bin", f"{split}_doc_starts.npy")}
    return {"tokens": n_tokens, "documents": n_docs, "bytes": n_bytes, "files": files}
