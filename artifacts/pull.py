"""Pulling an artifact from a store: pick the build for this machine, fetch it, put it in place.

The order keeps every refusal cheap and every failure clean: the index first (small), then the
choice (artifacts/store_match.py), then every file the entry lists into the blob cache
(artifacts/blob_fetch.py), each checked against its own key, so no index can slip other bytes in;
then the manifest, which hashes to the chosen digest by construction, must be one this runtime
reads and agree with its index entry. The artifact is assembled from hard links to the cached blobs
in a hidden staging directory beside the destination and renamed into place only when complete, so
a failed pull leaves nothing at the destination, and what it did receive waits in the cache for
the next try.

The cache is `$LLAMA_AOT_CACHE/artifacts` (default `~/.cache/llama-aot/artifacts`): `blobs/` holds
verified blobs, shared by every artifact pulled, and `pulled/DIGEST/NAME` what `llama-serve REF` runs.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llama_aot.artifacts.blob_fetch import Blob, BlobCache, Fetcher
from llama_aot.artifacts.digest import hash_file
from llama_aot.artifacts.errors import ArtifactError
from llama_aot.artifacts.local_cache import cache_root
from llama_aot.artifacts.manifest import read_manifest
from llama_aot.artifacts.store_index import MANIFEST_FILE, IndexEntry, StoreIndex, disagreements
from llama_aot.artifacts.store_match import best, compile_hint, misfits, this_machine
from llama_aot.artifacts.store_ref import StoreRef, looks_like_store, parse_ref
from llama_aot.artifacts.store_source import open_source

CONNECTIONS = 8


def cache_dir() -> Path:
    """Where pulled blobs and artifacts live: beside the build cache (compiler/build_cache.py)."""
    return cache_root() / "artifacts"


@dataclass(frozen=True)
class Pulled:
    path: Path
    entry: IndexEntry
    downloaded: int  # bytes received from the store in this run
    seconds: float  # from the first blob request to the artifact in place
    already: bool = False  # the destination held this artifact already


def describe(entry: IndexEntry) -> str:
    t = entry.target
    quant = "" if t["weight_quant"] == "none" else f" {t['weight_quant']}"
    return (f"{t['device_type']} {t['arch']}, tp {t['world_size']}, torch {t['torch']}, "
            f"{t['dtype']}{quant}, kv {t['kv_dtype']}")


def choose(index: StoreIndex, ref: StoreRef, tp: int | None = None) -> IndexEntry:
    """The artifact `ref` names or pins, or else the one that fits this machine best; an
    ArtifactError that lists every artifact and why it does not fit if none does."""
    entries = index.artifacts
    if not entries:
        raise ArtifactError(f"{ref.store}: the store is empty; publish into it with llama-artifacts publish "
                            "ARTIFACT_DIR STORE")
    listing = ", ".join(f"{e.name} sha256:{e.digest}" for e in entries.values())
    if ref.digest:
        pinned = [e for e in entries.values() if e.digest == ref.digest]
        if not pinned:
            raise ArtifactError(f"no artifact in {ref.store} has the pinned digest sha256:{ref.digest} (it has "
                                f"{listing}); check the pin")
        if ref.name and all(e.name != ref.name for e in pinned):
            actual = f"sha256:{entries[ref.name].digest}" if ref.name in entries else "not in the store"
            raise ArtifactError(f"{ref.store}:{ref.name} is {actual}, not the pinned sha256:{ref.digest}")
        return next(e for e in pinned if ref.name in (None, e.name))
    if ref.name:
        if ref.name not in entries:
            raise ArtifactError(f"{ref.store} has no artifact {ref.name!r} (it has {', '.join(sorted(entries))})")
        return entries[ref.name]
    host = this_machine()
    fits = [e for e in entries.values() if not misfits(e.target, host, tp)]
    if fits:
        return best(fits, host)
    why = "; ".join(f"{e.name} ({describe(e)}): {', '.join(misfits(e.target, host, tp))}"
                    for e in sorted(entries.values(), key=lambda e: e.name))
    raise ArtifactError(f"no artifact in {ref.store} fits this machine ({host.describe()}): {why}; build one here "
                        f"with: {compile_hint(host, tp)}")


def pull(ref: StoreRef, out: Path | None = None, *, tp: int | None = None, into_cache: bool = False,
         connections: int = CONNECTIONS, say: Callable[[str], None] = lambda line: None) -> Pulled:
    """Pulls the artifact `ref` picks into `out` (default artifacts/NAME, or with `into_cache` the
    cache's pulled/DIGEST/NAME); see the module docstring for the order and the guarantees."""
    source = open_source(ref)
    try:
        entry = choose(source.read_index(), ref, tp)
        dest = (cache_dir() / "pulled" / entry.digest / entry.name if into_cache
                else out or Path("artifacts") / entry.name)
        if _holds(dest, entry):
            return Pulled(dest, entry, 0, 0.0, already=True)
        if dest.exists():
            raise ArtifactError(f"{dest} exists and is not {entry.name} (sha256:{entry.digest}); remove it or "
                                "choose another -o")
        say(f"pulling {entry.name} (sha256:{entry.digest[:12]}, {entry.size / 1e6:.1f} MB) from {ref.store} "
            f"into {dest}")
        return _fetch(source, ref, entry, dest, connections)
    finally:
        source.close()


def _holds(dest: Path, entry: IndexEntry) -> bool:
    return (dest / MANIFEST_FILE).is_file() and hash_file(dest / MANIFEST_FILE)["root_sha256"] == entry.digest


def _fetch(source, ref: StoreRef, entry: IndexEntry, dest: Path, connections: int) -> Pulled:
    from tqdm import tqdm

    cache = BlobCache(cache_dir() / "blobs")
    start = time.perf_counter()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.pull-"))
    except OSError as e:
        raise ArtifactError(f"cannot write into {dest.parent} ({e.strerror}); choose another -o") from None
    try:
        with tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.name, disable=None,
                  file=sys.stderr, leave=False) as bar:
            fetcher = Fetcher(source, cache, connections, bar)
            fetcher.fetch([_blob(name, d) for name, d in entry.files.items()])
        _link(cache.path(entry.digest), staging / MANIFEST_FILE)
        manifest = _checked_manifest(staging, ref, entry)
        for name, d in manifest.files.items():
            _link(cache.path(d["root_sha256"]), staging / name)
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide it from the user serving it
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Pulled(dest, entry, fetcher.received, time.perf_counter() - start)


def _checked_manifest(staging: Path, ref: StoreRef, entry: IndexEntry):
    """The pulled manifest, once it is one this runtime reads and its index entry agrees with it
    (the files were fetched as the index lists them: each blob matches its key whatever the index
    says, and none is put in place unless the manifest lists it with that digest)."""
    try:
        manifest = read_manifest(staging)
    except ArtifactError as e:
        raise ArtifactError(f"{ref.store}: {entry.name}'s manifest is not usable here ({e})") from None
    if problems := disagreements(entry, manifest):
        raise ArtifactError(f"{ref.store}: the index entry of {entry.name} disagrees with its manifest "
                            f"({'; '.join(problems)}); the index was edited or is corrupt: republish {entry.name}")
    return manifest


def _blob(name: str, digest: dict) -> Blob:
    return Blob(digest["root_sha256"], digest["size"], digest["chunk_size"], name)


def _link(blob: Path, target: Path) -> None:
    """A hard link to a cached blob (free), or a copy where the cache is on another filesystem."""
    try:
        os.link(blob, target)
    except OSError:
        shutil.copyfile(blob, target)


def resolve_artifact(arg: str | Path, say: Callable[[str], None] = lambda line: None) -> Path:
    """What `llama-serve ARG` serves: an artifact directory as it is, or for a store REF the
    artifact pulled into the cache. A pinned REF already pulled is served without asking the store."""
    text = str(arg)
    if not looks_like_store(text):
        return Path(arg)
    ref = parse_ref(text)
    if ref.digest:
        pulled = cache_dir() / "pulled" / ref.digest
        hits = sorted(p for p in pulled.glob(ref.name or "*") if (p / MANIFEST_FILE).is_file())
        if hits:
            return hits[0]
    result = pull(ref, into_cache=True, say=say)
    if not result.already:
        say(f"pulled {result.entry.name} in {result.seconds:.1f} s")
    return result.path
