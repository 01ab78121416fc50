"""Token shards: each split's documents encoded in batches and written as one flat memmap of token ids
(uint16 when the vocabulary fits, else uint32), an end-of-document id after every document, with a
manifest (corpus fingerprint, tokenizer hash, counts). A second run with the same corpus and tokenizer
reuses them.

Beside each split's tokens, ``SPLIT_bytes.bin`` (uint32, one per token) holds the UTF-8 bytes of the text
each token covers, counted from the token's span in the document (:meth:`Tokenizer.encode_batch_with_bytes`);
bits per byte divides by these. The end-of-document id covers no text (0 bytes, or the trailing bytes
no token covered), so the counts of a split sum to its UTF-8 length (``manifest.splits.SPLIT.bytes``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from archifactory.data.tokenizer import Tokenizer, trailing_bytes
from archifactory.errors import InputError

MANIFEST_VERSION = 2  # 2: per-token byte counts (SPLIT_bytes.bin)
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
        return np.memmap(self.directory / f"{split}.bin", dtype=self.manifest["dtype"], mode="r")

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
    manifest_path = directory / "manifest.json"
    if manifest_path.is_file():
        try:
            return ShardSet(directory, json.loads(manifest_path.read_text()))
        except json.JSONDecodeError:
            shutil.rmtree(directory)  # a corrupt manifest: rebuild from the corpus
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
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        tmp.rename(directory)  # atomic: a killed build leaves only a tmp directory behind
    except OSError:
        shutil.rmtree(tmp)  # another process finished the same shards first
    return ShardSet(directory, json.loads(manifest_path.read_text()))


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
    return {"tokens": n_tokens, "documents": n_docs, "bytes": n_bytes}
