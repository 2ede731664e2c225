"""Fetching blobs into the local blob cache: ranged, parallel, resumable, verified, then renamed.

A blob is split at its digest's chunk boundaries (artifacts/digest.py, 16 MiB), and each chunk is
one range request on one of `connections` connections, so a 16 GB weights file downloads over
all of them and every chunk is hashed by the thread that receives it: the digest is known the
moment the last byte lands, with no second read of the file. The bytes go to `KEY.part` at their
offsets; `KEY.part.json` records how many bytes of each chunk are on disk, so a cut transfer (a
dropped connection retried in the same run, or a killed or failed run started again) asks only for
the bytes it lacks, and re-hashes from disk the ones it has. A blob whose digest matches is renamed
to `KEY` (read-only: pulled artifacts hard-link it); one that does not is fetched once more from
scratch, then refused. One pull at a time fetches into a cache (a lock file): another waits, then
finds the blobs there.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from llama_aot.artifacts.digest import file_matches, root
from llama_aot.artifacts.errors import ArtifactError
from llama_aot.artifacts.store_source import TransferCut

CUT_RETRIES = 3  # a dropped connection is retried (resuming) this many times before pull gives up
SAVE_EVERY_S = 0.5
# Bytes read, hashed and written at a time. Not more: a write of N bytes makes the kernel allocate
# page-cache folios of up to N bytes, and on the 2-core VM 1 MiB writes cost ~6 s of system time per
# GB against ~0.3 s for 256 KiB ones (docs/distribution.md, "Pull speed").
PIECE = 256 << 10


@dataclass(frozen=True)
class Blob:
    key: str
    size: int
    chunk_size: int
    label: str  # a file it holds, for messages

    def expected(self) -> dict:
        return {"size": self.size, "chunk_size": self.chunk_size, "root_sha256": self.key}


class BlobCache:
    """`DIR/KEY` holds verified blobs; `DIR/KEY.part` and `DIR/KEY.part.json` a download in progress."""

    def __init__(self, directory: Path):
        self.dir = directory

    def path(self, key: str) -> Path:
        return self.dir / key

    def verified(self, blob: Blob) -> Path | None:
        """The cached blob if it is there and still matches (a hard-linked copy can be edited)."""
        path = self.path(blob.key)
        if not path.is_file():
            return None
        if file_matches(path, blob.expected()):
            return path
        path.unlink()
        return None

    def adopt(self, blob: Blob, source: Path) -> Path:
        """Puts a verified file (the Hub cache's) in place: a hard link, or a copy across filesystems."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{blob.key}.")
        os.close(fd)
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, self.path(blob.key))
        return self.path(blob.key)


class _Partial:
    """One blob being downloaded: its .part file, its chunks' progress and digests."""

    def __init__(self, blob: Blob, cache: BlobCache):
        self.blob, self.lock = blob, threading.Lock()
        self.part, self.meta = cache.dir / f"{blob.key}.part", cache.dir / f"{blob.key}.part.json"
        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        self.done = self._resumed()
        self.digests: dict[int, bytes] = {}
        self.short = False
        self.saved_at = time.monotonic()

    def _resumed(self) -> dict[int, int]:
        try:
            meta = json.loads(self.meta.read_text())
            if meta["size"] != self.blob.size or meta["chunk_size"] != self.blob.chunk_size:
                raise ValueError("another blob's progress")
            on_disk = os.fstat(self.fd).st_size
            done = {}
            for i, n in meta["done"].items():
                start = int(i) * self.blob.chunk_size
                done[int(i)] = max(0, min(int(n), self.span(int(i))[1] - start, on_disk - start))
            return done
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            if os.fstat(self.fd).st_size:  # not on an empty file: ext4 then flushes it all on close
                os.ftruncate(self.fd, 0)
            return {}

    def span(self, i: int) -> tuple[int, int]:
        start = i * self.blob.chunk_size
        return start, min(start + self.blob.chunk_size, self.blob.size)

    @property
    def chunks(self) -> int:
        return -(-self.blob.size // self.blob.chunk_size)

    def missing_bytes(self) -> int:
        return self.blob.size - sum(self.done.values())

    def advance(self, i: int, n: int) -> None:
        with self.lock:
            self.done[i] = n
            if time.monotonic() - self.saved_at > SAVE_EVERY_S:
                self._save()

    def save(self) -> None:
        with self.lock:
            self._save()

    def _save(self) -> None:
        tmp = self.meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"size": self.blob.size, "chunk_size": self.blob.chunk_size,
                                   "done": {str(i): n for i, n in self.done.items()}}))
        os.replace(tmp, self.meta)
        self.saved_at = time.monotonic()

    def close(self) -> None:
        """Keeps what was received for the next run."""
        self.save()
        os.close(self.fd)

    def finish(self, cache: BlobCache) -> bool:
        """Renames a blob whose digest matches into the cache; discards one that does not."""
        digests = [self.digests[i] for i in range(self.chunks)]
        os.close(self.fd)
        if not self.short and root(digests) == self.blob.key and os.stat(self.part).st_size == self.blob.size:
            os.chmod(self.part, 0o444)
            os.replace(self.part, cache.path(self.blob.key))
            self.meta.unlink(missing_ok=True)
            return True
        self.discard()
        return False

    def discard(self) -> None:
        for path in (self.part, self.meta):
            path.unlink(missing_ok=True)


class Fetcher:
    """Fetches blobs from one source into one cache; `bar` (tqdm-like, or None) hears of bytes."""

    def __init__(self, source, cache: BlobCache, connections: int = 8, bar=None):
        self.source, self.cache, self.connections, self.bar = source, cache, connections, bar
        self.cancel, self.lock = threading.Event(), threading.Lock()
        self.received = 0

    def fetch(self, blobs: list[Blob]) -> None:
        """Every blob verified in the cache, or an ArtifactError; a blob whose digest does not match
        is fetched again once."""
        self.cache.dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another pull into this cache writes the same .part files
            wanted = [b for b in {b.key: b for b in blobs}.values() if self.cache.verified(b) is None]
            bad = self._round(wanted, retry=False)
            if bad:
                bad = self._round(bad, retry=True)
        if bad:
            names = ", ".join(f"{b.label} (blob {b.key[:12]})" for b in bad)
            raise ArtifactError(f"{names} from {self.source.ref.store} does not match its sha256, twice; the store "
                                "is corrupt or was tampered with: republish the artifact")

    def _round(self, blobs: list[Blob], retry: bool) -> list[Blob]:
        """Fetches `blobs`; returns those whose digest did not match."""
        if not blobs:
            return []
        if self.source.whole_files:
            return self._hub_round(blobs, retry)
        partials = [_Partial(b, self.cache) for b in sorted(blobs, key=lambda b: -b.size)]
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + sum(p.missing_bytes() for p in partials)
            self.bar.refresh()
        try:
            self._run(lambda item: self._chunk(*item), [(p, i) for p in partials for i in range(p.chunks)])
        except BaseException:
            for p in partials:
                p.close()
            raise
        return [p.blob for p in partials if not p.finish(self.cache)]

    def _run(self, task, items) -> None:
        if not items:
            return
        with ThreadPoolExecutor(max_workers=min(self.connections, len(items))) as pool:
            futures = [pool.submit(task, item) for item in items]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in futures if f.done() and f.exception() is not None]
                if failed:
                    raise failed[0].exception()
            except BaseException:
                self.cancel.set()
                for f in futures:
                    f.cancel()
                raise

    def _chunk(self, p: _Partial, i: int) -> None:
        """Fetches chunk `i` of a blob (what is not on disk yet) and records its digest."""
        start, end = p.span(i)
        have = p.done.get(i, 0)
        h = hashlib.sha256(os.pread(p.fd, have, start) if have else b"")
        pos, cuts = start + have, 0
        while pos < end:
            try:
                pos = self._stream(p, i, h, pos, end)
                if self.cancel.is_set():
                    return
                if pos < end:
                    p.short = True  # the store's blob is shorter than its digest says
                    break
            except TransferCut as e:
                cuts += 1
                pos = start + p.done.get(i, 0)
                p.save()
                if cuts > CUT_RETRIES:
                    raise ArtifactError(f"the transfer of {p.blob.label} from {self.source.ref.store} was cut "
                                        f"{cuts} times ({e}); run the same command again to resume") from None
                time.sleep(0.2 * cuts)
        p.digests[i] = h.digest()

    def _stream(self, p: _Partial, i: int, h, pos: int, end: int) -> int:
        """Writes and hashes the bytes [pos, end) as they arrive, a PIECE at a time through one
        buffer, in this thread: hashlib and pwrite release the GIL on buffers this large, so the
        connections hash in parallel. What arrived before the server closed the connection is
        written too (a reset loses at most the piece in flight). Returns the position reached."""
        start = p.span(i)[0]
        buffer = memoryview(bytearray(PIECE))
        for piece in self.source.read_range(p.blob.key, pos, end, buffer):
            _pwrite_all(p.fd, piece, pos)
            h.update(piece)
            pos += len(piece)
            p.advance(i, pos - start)
            self._received(len(piece))
            if self.cancel.is_set():
                break
        return pos

    def _received(self, n: int) -> None:
        with self.lock:
            self.received += n
        if self.bar is not None:
            self.bar.update(n)

    def _hub_round(self, blobs: list[Blob], retry: bool) -> list[Blob]:
        bad = []

        def one(blob: Blob) -> None:
            path = self.source.local_file(blob.key, retry)
            if not file_matches(path, blob.expected()):
                bad.append(blob)
                return
            self.cache.adopt(blob, path)
            self._received(blob.size)

        self._run(one, blobs)
        return bad


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
