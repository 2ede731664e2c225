"""The build cache: finished artifacts kept under the hash of their build inputs, so that an
unchanged rebuild links files instead of compiling, within a disk budget.

The budget exists because every key changes with the compiler source and torch: after each
upgrade, a rebuild of an 8B model leaves its old 16 GB entry behind, and a 70B one 140 GB. What
counts against the budget is what the cache alone holds on disk. Entries are hard-linked into the
artifacts built from them, so an entry whose artifact still exists costs nothing, and evicting it
would free nothing. Entries are evicted least recently used first; the one a build just used or
stored is never evicted, whatever the budget.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from llama_aot.artifacts.digest import check_files
from llama_aot.artifacts.errors import ArtifactError
from llama_aot.artifacts.local_cache import cache_root
from llama_aot.artifacts.manifest import checked_manifest
from llama_aot.compiler.errors import BuildError

MAX_GB_ENV = "LLAMA_AOT_CACHE_MAX_GB"
DEFAULT_MAX_GB = 64.0  # four 8B bf16 builds whose artifacts were deleted or replaced
STAGING_PREFIX = ".tmp-"
STALE_STAGING_S = 24 * 3600  # a staging directory this old was left by a killed build


def budget_bytes() -> int:
    raw = os.environ.get(MAX_GB_ENV)
    if raw is None or raw == "":
        return int(DEFAULT_MAX_GB * 2**30)
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb >= 0 or gb == float("inf"):
        raise BuildError(f"{MAX_GB_ENV}={raw!r}: expected a size in GiB, 0 or more (e.g. 64)")
    return int(gb * 2**30)


def link_tree(src: Path, dst: Path) -> None:
    """Hard-links when src and dst share a filesystem (free), copies otherwise."""
    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link_or_copy)


def entry_path(key: str) -> Path:
    return cache_root() / "builds" / key


def lookup(key: str, target: str) -> Path | None:
    """The complete entry for `key` built for `target`, marked as just used; None on a miss."""
    entry = entry_path(key)
    try:
        check_files(entry, checked_manifest(entry, target)[0].files)
    except (ArtifactError, OSError):
        return None
    with contextlib.suppress(OSError):  # a read-only shared cache still serves hits
        os.utime(entry)
    return entry


def store(tmp: Path, key: str) -> str | None:
    """Copies a finished build into the cache. Best effort: returns why it could not, because a
    cache we cannot write costs the next build time, never this build."""
    entry = entry_path(key)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=entry.parent))
        os.rmdir(staging)
        link_tree(tmp, staging)
        shutil.rmtree(entry, ignore_errors=True)
        os.rename(staging, entry)
    except OSError as e:
        return str(e)
    return None


def exclusive_bytes(entry: Path) -> int:
    """Bytes that only this entry holds: files with no other hard link (an artifact's)."""
    total = 0
    for path in entry.rglob("*"):
        st = path.lstat()  # one stat per file; a symlink is not a regular file here
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            total += st.st_size
    return total


def prune(keep: str, max_bytes: int) -> list[str]:
    """Evicts least recently used entries until the cache's own bytes fit `max_bytes`, and
    removes staging directories of killed builds. Returns the evicted keys. Never evicts `keep`."""
    builds = cache_root() / "builds"
    if not builds.is_dir():
        return []
    now = time.time()
    entries = []
    for path in builds.iterdir():
        try:
            if path.name.startswith(STAGING_PREFIX):
                if now - path.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir():
                entries.append((path.stat().st_mtime, path, exclusive_bytes(path)))
        except OSError:  # another build renamed or evicted it meanwhile
            continue
    total = sum(size for _, _, size in entries)
    evicted = []
    for _, path, size in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if path.name == keep or size == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= size
        evicted.append(path.name)
    return evicted
