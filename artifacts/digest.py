"""File digests: what the manifest records for every file of an artifact, and the checks against it.

The digest (one manifest entry per file):
    {"size": bytes, "chunk_size": C, "root_sha256": hex}
    hex = sha256(sha256(chunk 0) || sha256(chunk 1) || ...)
over the raw 32-byte digests of consecutive C-byte chunks (the last may be shorter; an empty file
has none). Chunk digests let many threads hash one file (an 8B model's weights are one 16 GB
file), the single root keeps the manifest small, and the size refuses a truncated file before any
read. It is not `sha256sum`'s value. The runtime's weights loader computes the same digest while it
streams a weights file into memory (runtime/weights_loader.py), so those bytes are read once.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from llama_aot.artifacts.errors import ArtifactError

CHUNK_SIZE = 16 << 20
MAX_THREADS = 16


class DigestMismatch(Exception):
    """The file's bytes are not the ones its expected digest describes (modified, corrupt or cut)."""


def threads() -> int:
    """One worker per core the process may use, capped: past ~16 the disk or PCIe is the limit."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))


def map_chunks(size: int, chunk_size: int, work: Callable[[int, int], bytes]) -> list[bytes]:
    """work(offset, length) over a file's chunks on a thread pool, results in file order."""
    if chunk_size <= 0:
        raise ValueError(f"chunk size {chunk_size} must be positive")
    spans = [(offset, min(chunk_size, size - offset)) for offset in range(0, size, chunk_size)]
    if not spans:
        return []
    with ThreadPoolExecutor(max_workers=min(threads(), len(spans))) as pool:
        try:
            return list(pool.map(lambda span: work(*span), spans))
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def hash_chunks(buffer, chunk_size: int) -> list[bytes]:
    """The chunk digests of a buffer (hashlib releases the GIL, so the threads run in parallel)."""
    view = memoryview(buffer)
    try:
        return map_chunks(len(view), chunk_size, lambda offset, n: hashlib.sha256(view[offset:offset + n]).digest())
    finally:
        view.release()


def root(digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(digests)).hexdigest()


def hash_file(path: Path, chunk_size: int = CHUNK_SIZE) -> dict:
    """The file's manifest entry."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digests = []
        if size:
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapping:
                digests = hash_chunks(mapping, chunk_size)
    return {"size": size, "chunk_size": chunk_size, "root_sha256": root(digests)}


def file_matches(path: Path, expected: dict) -> bool:
    return path.stat().st_size == expected["size"] and hash_file(path, expected["chunk_size"]) == expected


def hash_files(directory: Path, names: list[str]) -> dict[str, dict]:
    """The manifest's `files`: each file's digest."""
    return {name: hash_file(directory / name) for name in names}


def mismatch_message(path: Path, names: list[str]) -> str:
    return (f"{path}: {', '.join(names)} does not match the sha256 in manifest.json "
            "(modified or corrupt); rebuild or re-download the artifact")


def check_files(path: Path, files: dict[str, dict], streamed: frozenset[str] = frozenset()) -> None:
    """Every file of `files` (the manifest's) is present in `path` and, except the `streamed` ones
    (verified as they load), matches its digest; else ArtifactError."""
    missing = [n for n in files if not (path / n).is_file()]
    if missing:
        raise ArtifactError(f"{path}: missing files {missing}; the artifact is incomplete, rebuild it")
    bad = [n for n, entry in files.items() if n not in streamed and not file_matches(path / n, entry)]
    if bad:
        raise ArtifactError(mismatch_message(path, bad))
