"""Checksums for the files a run writes and later reads back (checkpoints, token shards, cached
tokenizers, saved models), so that a damaged file is detected and never used.

Each file's size and 128-bit XXH3 digest (``xxhash``; not cryptographic: it guards against truncation
and bit rot, not tampering) are computed once when it is written and checked when it is read. XXH3
reads at memory speed (several GB/s on one core), so verification costs about one sequential read
of the file. A directory written by one process lists its files in ``checksums.json``; files written
alone (a cached tokenizer) carry a sidecar ``<name>.checksum``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import xxhash

from archifactory.errors import UserError

ALGORITHM = "xxh3_128"
CHECKSUMS = "checksums.json"
_CHUNK = 1 << 22  # 4 MiB


class CorruptFileError(UserError, RuntimeError):
    """A file does not match the size or digest recorded when it was written, or cannot be parsed."""


def file_digest(path: str | Path) -> dict:
    """``{"bytes": size, "xxh3_128": hex digest}`` of a file, read in 4 MiB chunks."""
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, ALGORITHM: h.hexdigest()}


def bytes_digest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def mismatch(path: str | Path, expected: dict) -> str | None:
    """Why ``path`` does not match ``expected`` (a :func:`file_digest` record), or ``None`` if it does.
    The size is compared first, so a truncated file is reported without reading it."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{path.name} has {size:,} bytes, {expected['bytes']:,} were written"
    if file_digest(path)[ALGORITHM] != expected[ALGORITHM]:
        return f"{path.name} does not match its {ALGORITHM} checksum"
    return None


def write_json_atomic(path: str | Path, data) -> None:
    """Write JSON through a temporary file and an atomic rename (no half-written file on a crash)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_checksums(directory: str | Path, names: list[str]) -> None:
    """Record the size and digest of ``names`` (files in ``directory``) in ``directory/checksums.json``."""
    directory = Path(directory)
    files = {name: file_digest(directory / name) for name in names}
    write_json_atomic(directory / CHECKSUMS, {"algorithm": ALGORITHM, "files": files})


def verify_checksums(directory: str | Path, required: tuple[str, ...] = ()) -> list[str] | None:
    """Problems found checking ``directory`` against its ``checksums.json`` (empty: intact), or ``None``
    when the directory has no checksums (written before they existed: only ``required`` files are
    checked to exist)."""
    directory = Path(directory)
    listing = directory / CHECKSUMS
    if not listing.is_file():
        missing = [f"{name} is missing" for name in required if not (directory / name).is_file()]
        return missing or None
    try:
        files = json.loads(listing.read_bytes())["files"]
        problems = [mismatch(directory / name, files[name]) for name in sorted(files)]
    except (ValueError, KeyError, TypeError):
        return [f"{CHECKSUMS} is damaged"]
    problems += [f"{name} is not listed in {CHECKSUMS}" for name in required if name not in files]
    return [p for p in problems if p]


def write_sidecar(path: str | Path) -> None:
    """Record ``path``'s size and digest in ``<path>.checksum``."""
    path = Path(path)
    write_json_atomic(path.with_name(path.name + ".checksum"), file_digest(path))


def verify_sidecar(path: str | Path) -> str | None:
    """Why ``path`` does not match its ``<path>.checksum`` (``None``: it does, or there is no sidecar)."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".checksum")
    if not sidecar.is_file():
        return None
    try:
        expected = json.loads(sidecar.read_bytes())
        return mismatch(path, expected)
    except (ValueError, KeyError, TypeError):
        return f"{sidecar.name} is damaged"
