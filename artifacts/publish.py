"""Publishing an artifact into a store: a local directory (serve it with any static HTTP host) or a
Hugging Face Hub repo.

The artifact is checked in full first (every file against its manifest digest), since its digests
become the blob keys: a corrupt file published would be refused by every pull. A blob the store
already has is not written again, so a second build of one checkpoint adds only what changed.
Into a directory, each blob is copied under a temporary name and renamed, and the index is
replaced last, under a lock: a reader never sees an index that names a blob not yet there. Into a
Hub repo, the new blobs and the new index are one commit whose parent is the commit the index was
read from, so two publishers racing cannot drop each other's entry (the second one fails and can
run again). Re-publishing a name replaces its entry; the old blobs stay (content-addressed, maybe
shared).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llama_aot.artifacts.digest import check_files
from llama_aot.artifacts.errors import ArtifactError
from llama_aot.artifacts.manifest import read_manifest
from llama_aot.artifacts.store_index import IndexEntry, StoreIndex, entry_for, parse_index
from llama_aot.artifacts.store_ref import INDEX_FILE, StoreRef, check_name, parse_ref
from llama_aot.artifacts.store_source import blob_path


@dataclass(frozen=True)
class Published:
    entry: IndexEntry
    new_blobs: int
    new_bytes: int
    replaced: bool  # the store had another artifact under this name


def publish(artifact: Path, dest: str, name: str | None = None, hub_api=None) -> Published:
    """Publishes the artifact directory `artifact` into the store `dest` under `name` (default:
    the directory's name). `hub_api` stands in for huggingface_hub.HfApi()."""
    manifest = read_manifest(artifact)
    check_files(artifact, manifest.files)
    entry = entry_for(artifact, manifest, check_name(name or artifact.resolve().name))
    ref = parse_ref(dest)
    if ref.name or ref.digest:
        raise ArtifactError(f"{dest}: publish into a store, without :NAME or @sha256: (name the artifact with --name)")
    if ref.kind == "http":
        raise ArtifactError(f"{dest}: an HTTP store is read-only here; publish into a directory and serve that "
                            "directory, or publish to hf://ORG/REPO")
    if ref.kind == "hf":
        return _publish_hub(ref, artifact, entry, hub_api)
    return _publish_local(Path(ref.location), artifact, entry)


@contextlib.contextmanager
def _locked(root: Path):
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _publish_local(root: Path, artifact: Path, entry: IndexEntry) -> Published:
    index_path = root / INDEX_FILE
    if root.exists() and (not root.is_dir() or (not index_path.is_file() and any(root.iterdir()))):
        raise ArtifactError(f"{root}: exists and is not a store (no {INDEX_FILE}); publish into a new or empty "
                            "directory")
    try:
        (root / "blobs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create the store {root} ({e.strerror}); choose a writable directory") from None
    with _locked(root):
        index = parse_index(index_path.read_bytes(), str(root)) if index_path.is_file() else StoreIndex.empty()
        new_blobs = new_bytes = 0
        for file, digest in entry.files.items():
            blob = root / blob_path(digest["root_sha256"])
            if blob.is_file() and blob.stat().st_size == digest["size"]:
                continue
            fd, tmp = tempfile.mkstemp(dir=blob.parent, prefix=f".{blob.name}.")
            os.close(fd)
            try:
                shutil.copyfile(artifact / file, tmp)
                os.chmod(tmp, 0o444)
                os.replace(tmp, blob)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            new_blobs, new_bytes = new_blobs + 1, new_bytes + digest["size"]
        old = index.artifacts.get(entry.name)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{INDEX_FILE}.")
        with os.fdopen(fd, "w") as f:
            f.write(index.with_entry(entry).to_json())
        os.chmod(tmp, 0o644)
        os.replace(tmp, index_path)
    return Published(entry, new_blobs, new_bytes, old is not None and old.digest != entry.digest)


def _publish_hub(ref: StoreRef, artifact: Path, entry: IndexEntry, api=None) -> Published:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api or HfApi()
    repo = ref.location
    try:
        api.create_repo(repo, exist_ok=True)
        parent = api.repo_info(repo, revision=ref.revision).sha
        present = set(api.list_repo_files(repo, revision=parent))
        index = (parse_index(Path(api.hf_hub_download(repo, INDEX_FILE, revision=parent)).read_bytes(), ref.store)
                 if INDEX_FILE in present else StoreIndex.empty())
        new = {d["root_sha256"]: (file, d["size"]) for file, d in entry.files.items()
               if blob_path(d["root_sha256"]) not in present}
        operations = [CommitOperationAdd(path_in_repo=blob_path(key), path_or_fileobj=str(artifact / file))
                      for key, (file, _) in new.items()]
        operations.append(CommitOperationAdd(path_in_repo=INDEX_FILE,
                                             path_or_fileobj=index.with_entry(entry).to_json().encode()))
        api.create_commit(repo, operations, commit_message=f"llama-artifacts publish {entry.name} "
                          f"(sha256:{entry.digest})", revision=ref.revision, parent_commit=parent)
    except (HfHubHTTPError, OSError) as e:
        raise ArtifactError(f"cannot publish to {ref.store} ({type(e).__name__}: {e}); check the network, that you "
                            "are logged in (`hf auth login` or HF_TOKEN) with write access, and run it again") from None
    old = index.artifacts.get(entry.name)
    return Published(entry, len(new), sum(size for _, size in new.values()),
                     old is not None and old.digest != entry.digest)
