"""Token shards: each split's documents encoded in batches and written as one flat memmap of token ids
(uint16 when the vocabulary fits, else uint32), an end-of-document id after every document, with a
manifest (corpus fingerprint, tokenizer hash, counts). A second run with the same corpus and tokenizer
reuses them."""

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

from archifactory.data.tokenizer import Tokenizer

MANIFEST_VERSION = 1
ENCODE_BATCH = 256


@dataclasses.dataclass
class ShardSet:
    directory: Path
    manifest: dict

    def tokens(self, split: str) -> np.ndarray:
        info = self.manifest["splits"][split]
        if info["tokens"] == 0:
            return np.zeros(0, dtype=self.manifest["dtype"])
        return np.memmap(self.directory / f"{split}.bin", dtype=self.manifest["dtype"], mode="r")

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
        raise ValueError(f"corpus {corpus.kind!r} gave no training text: check its paths and val_fraction")
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
    with open(directory / f"{split}.bin", "wb") as out:
        batch: list[str] = []

        def flush():
            nonlocal n_tokens, n_docs, n_bytes
            for text, ids in zip(batch, tokenizer.encode_batch(batch)):
                starts.append(n_tokens)
                ids.append(tokenizer.eos_id)
                np.asarray(ids, dtype=dtype).tofile(out)
                n_tokens += len(ids)
                n_bytes += len(text.encode("utf-8"))
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
