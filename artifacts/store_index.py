"""The store index: the one file that says what a store holds.

A store is static files, so any HTTP host, a directory or a Hugging Face Hub repo can hold one:

    llama-aot-index.json   this index
    blobs/KEY              every file of every artifact, once, under its digest's root_sha256

The index (format 1):

    {"format": "llama-aot-store", "format_version": 1,
     "artifacts": {NAME: {"digest": "sha256:HEX",      the manifest.json blob's root, which names the
                                                         whole artifact: the manifest holds every
                                                         other file's digest
                          "target": {device_type, arch, device_name, world_size, torch, triton,
                                     dtype, weight_quant, kv_dtype},
                          "files": {FILE: digest entry (artifacts/digest.py), manifest.json included},
                          "published": ISO time}}}

Blob keys are artifacts/digest.py's chunked sha256 roots, the values the manifest already records,
so publishing hashes nothing new and pull checks each file as the loader will. Identical files
(tokenizers; the weights of two builds of one checkpoint) share a key and are stored once.

The index is a catalogue, not the authority: pull checks the manifest blob against the entry's
digest and the entry's target and files against that manifest, so an edited index is refused.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_aot.artifacts.digest import hash_file
from llama_aot.artifacts.errors import ArtifactError
from llama_aot.artifacts.store_ref import INDEX_FILE, NAME_PATTERN

if TYPE_CHECKING:
    from llama_aot.artifacts.manifest import Manifest

# manifest.py's MANIFEST_FILE (a test checks they agree): importing manifest.py imports torch, ~2 s
# that `llama-artifacts pull` spends downloading instead (artifacts/pull.py).
MANIFEST_FILE = "manifest.json"

STORE_FORMAT = "llama-aot-store"
STORE_FORMAT_VERSION = 1
TARGET_KEYS = ("device_type", "arch", "device_name", "world_size", "torch", "triton", "dtype", "weight_quant",
               "kv_dtype")
DIGEST_KEYS = {"size", "chunk_size", "root_sha256"}


@dataclass(frozen=True)
class IndexEntry:
    """One published artifact: what it runs on, and its files' digests."""

    name: str
    digest: str  # the manifest blob's root_sha256, hex
    target: dict[str, Any]
    files: dict[str, dict]
    published: str = ""

    @property
    def size(self) -> int:
        return sum(entry["size"] for entry in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        return {"digest": f"sha256:{self.digest}", "target": self.target, "files": self.files,
                "published": self.published}


def target_of(manifest: Manifest) -> dict[str, Any]:
    """The index's target fields, from a manifest: where it runs and what it holds."""
    t, build = manifest.target, manifest.build
    return {"device_type": t["device_type"], "arch": t["arch"], "device_name": t["device_name"],
            "world_size": t["world_size"], "torch": manifest.producer["torch"],
            "triton": manifest.producer.get("triton"), "dtype": build.dtype, "weight_quant": build.weight_quant,
            "kv_dtype": build.kv_dtype}


def entry_for(directory: Path, manifest: Manifest, name: str) -> IndexEntry:
    """The entry that publishing the artifact at `directory` (checked already) adds."""
    files = {MANIFEST_FILE: hash_file(directory / MANIFEST_FILE), **manifest.files}
    return IndexEntry(name, files[MANIFEST_FILE]["root_sha256"], target_of(manifest), files,
                      time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def disagreements(entry: IndexEntry, manifest: Manifest) -> list[str]:
    """Where an index entry says otherwise than the manifest it names (an edited or corrupt index)."""
    problems = []
    actual = target_of(manifest)
    problems += [f"target.{k} {entry.target.get(k)!r} vs {actual[k]!r}" for k in TARGET_KEYS
                 if entry.target.get(k) != actual[k]]
    listed = {k: v for k, v in entry.files.items() if k != MANIFEST_FILE}
    if listed != manifest.files:
        changed = sorted(set(listed) ^ set(manifest.files) | {k for k in listed if manifest.files.get(k) != listed[k]})
        problems.append(f"files {changed}")
    return problems


@dataclass(frozen=True)
class StoreIndex:
    artifacts: dict[str, IndexEntry]

    @classmethod
    def empty(cls) -> "StoreIndex":
        return cls({})

    def with_entry(self, entry: IndexEntry) -> "StoreIndex":
        return StoreIndex({**self.artifacts, entry.name: entry})

    def keys(self) -> set[str]:
        """Every blob the store should hold."""
        return {d["root_sha256"] for e in self.artifacts.values() for d in e.files.values()}

    def to_json(self) -> str:
        return json.dumps({"format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION,
                           "artifacts": {n: e.to_dict() for n, e in sorted(self.artifacts.items())}},
                          indent=2) + "\n"


def parse_index(raw: bytes, where: str) -> StoreIndex:
    """The index in `raw` (read from `where`), or an ArtifactError naming what is malformed."""
    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{where}: malformed store index {INDEX_FILE} ({why}); republish the store's "
                             "artifacts with llama-artifacts publish")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
        raise bad(f"no \"format\": \"{STORE_FORMAT}\"")
    if data.get("format_version") != STORE_FORMAT_VERSION:
        raise ArtifactError(f"{where}: store format {data.get('format_version')}, this llama-artifacts reads format "
                            f"{STORE_FORMAT_VERSION}; upgrade llama-aot or republish")
    artifacts = data.get("artifacts")
    if not isinstance(artifacts, dict):
        raise bad("\"artifacts\" is not an object")
    entries = {}
    for name, raw_entry in artifacts.items():
        try:
            entries[name] = _entry(name, raw_entry)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise bad(f"artifact {name!r}: {e}") from None
    return StoreIndex(entries)


def _entry(name: str, data: dict) -> IndexEntry:
    if not NAME_PATTERN.match(name):
        raise ValueError("invalid name")
    digest = data["digest"]
    if not (isinstance(digest, str) and digest.startswith("sha256:") and len(digest) == 71):
        raise ValueError(f"digest {digest!r} is not sha256:HEX")
    files = data["files"]
    target = data["target"]
    if not isinstance(target, dict) or set(target) != set(TARGET_KEYS):
        raise ValueError(f"target must have the keys {list(TARGET_KEYS)}")
    for file, d in files.items():
        if "/" in file or file.startswith(".") or not isinstance(d, dict) or set(d) != DIGEST_KEYS:
            raise ValueError(f"file entry {file!r}")
        if not (isinstance(d["size"], int) and d["size"] >= 0 and isinstance(d["chunk_size"], int)
                and d["chunk_size"] > 0 and isinstance(d["root_sha256"], str) and len(d["root_sha256"]) == 64
                and all(c in "0123456789abcdef" for c in d["root_sha256"])):
            raise ValueError(f"file entry {file!r}: {d}")
    if files.get(MANIFEST_FILE, {}).get("root_sha256") != digest[7:]:
        raise ValueError(f"its digest is not its {MANIFEST_FILE}'s")
    return IndexEntry(name, digest[7:], target, files, str(data.get("published", "")))
