"""Reading a store: its index and byte ranges of its blobs, from a directory, over HTTP, or
from a Hugging Face Hub repo.

HTTP sources ask for byte ranges (`Range: bytes=A-B`), so that pull can fetch one file over several
connections and resume a cut transfer where it stopped. A Hub repo goes through huggingface_hub,
which brings the Hub's auth, its CDN and Xet transfers, its own resume, and `HF_HUB_OFFLINE` with
its cache; pull then links the file out of the Hub cache rather than copying it.

Errors a user can fix are ArtifactErrors (unreachable, not a store, a blob missing); a transfer
that stops mid-way raises TransferCut, which pull retries from where it stopped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from llama_aot.artifacts.errors import ArtifactError
from llama_aot.artifacts.store_index import StoreIndex, parse_index
from llama_aot.artifacts.store_ref import INDEX_FILE, StoreRef

PIECE = 1 << 20
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0


class TransferCut(Exception):
    """The connection failed after the transfer started; the bytes received so far are kept."""


class BlobMissing(ArtifactError):
    pass


def blob_path(key: str) -> str:
    return f"blobs/{key}"


class LocalSource:
    """A store in a directory (or a mounted filesystem)."""

    whole_files = False

    def __init__(self, ref: StoreRef):
        self.ref, self.root = ref, Path(ref.location)

    def read_index(self) -> StoreIndex:
        path = self.root / INDEX_FILE
        if not self.root.is_dir():
            raise ArtifactError(f"{self.root}: no such store directory")
        if not path.is_file():
            raise ArtifactError(f"{self.root}: not a store (no {INDEX_FILE}); publish into it with "
                                "llama-artifacts publish ARTIFACT_DIR DEST")
        return parse_index(path.read_bytes(), str(self.root))

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        path = self.root / blob_path(key)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise BlobMissing(f"{self.ref.store}: blob {key} is missing; republish the artifact") from None
        with f:
            f.seek(start)
            while start < end and (piece := f.read(min(PIECE, end - start))):
                start += len(piece)
                yield piece

    def close(self) -> None:
        pass


class HttpSource:
    """A store served over HTTP(S) by any static file host that honours range requests."""

    whole_files = False

    def __init__(self, ref: StoreRef, connections: int = 8):
        import httpx

        self.ref, self.base, self.httpx = ref, ref.location, httpx
        self.client = httpx.Client(
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S), follow_redirects=True,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            headers={"Accept-Encoding": "identity", "User-Agent": "llama-artifacts"})

    def _unreachable(self, e: Exception) -> ArtifactError:
        return ArtifactError(f"cannot reach the store at {self.ref.store} ({type(e).__name__}: {e}); check the URL "
                             "and that its server is up")

    def read_index(self) -> StoreIndex:
        url = self.base + INDEX_FILE
        try:
            response = self.client.get(url)
        except self.httpx.HTTPError as e:
            raise self._unreachable(e) from None
        if response.status_code == 404:
            raise ArtifactError(f"{self.ref.store}: not a store (no {INDEX_FILE} at {url}); check the URL")
        if response.status_code != 200:
            raise ArtifactError(f"{url}: HTTP {response.status_code}; check the URL and the server")
        return parse_index(response.content, self.ref.store)

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """The bytes [start, end) of a blob. A server that ignores Range (a 200 with the whole
        file) is refused past the first chunk: skipping to each chunk would fetch a 16 GB file
        a thousand times over."""
        url = self.base + blob_path(key)
        try:
            with self.client.stream("GET", url, headers={"Range": f"bytes={start}-{end - 1}"}) as response:
                if response.status_code == 404:
                    raise BlobMissing(f"{self.ref.store}: blob {key} is missing ({url}: 404); republish the artifact")
                if response.status_code == 416:
                    return  # the blob is shorter than the index says: pull refuses it as corrupt
                if response.status_code not in (200, 206):
                    raise ArtifactError(f"{url}: HTTP {response.status_code}; check the store's server")
                if response.status_code == 200 and start > 0:
                    raise ArtifactError(f"{self.ref.store}: the server ignores range requests (HTTP 200 for a range); "
                                        "serve the store with one that honours them (nginx, caddy, S3, uvicorn with "
                                        "starlette's StaticFiles)")
                if response.status_code == 206 and not response.headers.get("content-range", "").startswith(
                        f"bytes {start}-"):
                    raise ArtifactError(f"{url}: the server answered the range from byte {start} with "
                                        f"{response.headers.get('content-range')!r}; check the store's server")
                for piece in response.iter_raw():  # as it arrives: a re-chunking buffer would lose bytes on a cut
                    piece = piece[:end - start]
                    if piece:
                        yield piece
                        start += len(piece)
                    if start >= end:
                        return
        except (self.httpx.ConnectError, self.httpx.ConnectTimeout) as e:
            raise self._unreachable(e) from None
        except self.httpx.TransportError as e:
            raise TransferCut(f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        self.client.close()


class HubSource:
    """A store in a Hugging Face Hub repo (model type), read through huggingface_hub."""

    whole_files = True  # fetched by huggingface_hub into its cache, then linked

    def __init__(self, ref: StoreRef):
        self.ref = ref

    def _download(self, filename: str, force: bool = False) -> Path:
        from huggingface_hub import errors, hf_hub_download

        repo = self.ref.location
        try:
            return Path(hf_hub_download(repo, filename, revision=self.ref.revision, force_download=force))
        except errors.RepositoryNotFoundError:
            raise ArtifactError(f"{self.ref.store}: no such Hub repo, or a private one (log in with `hf auth login` "
                                "or set HF_TOKEN)") from None
        except errors.RevisionNotFoundError:
            raise ArtifactError(f"{self.ref.store}: the repo has no revision {self.ref.revision!r}") from None
        except errors.LocalEntryNotFoundError:  # before its base class, EntryNotFoundError
            raise ArtifactError(f"{self.ref.store}: {filename} is not in the Hugging Face cache and the Hub cannot "
                                "be reached (offline, or HF_HUB_OFFLINE is set); connect, or unset HF_HUB_OFFLINE"
                                ) from None
        except errors.EntryNotFoundError:
            if filename == INDEX_FILE:
                raise ArtifactError(f"{self.ref.store}: not a store (no {INDEX_FILE} in the repo); publish into it "
                                    "with llama-artifacts publish ARTIFACT_DIR hf://ORG/REPO") from None
            raise BlobMissing(f"{self.ref.store}: {filename} is missing from the repo; republish the artifact"
                              ) from None
        except (errors.HfHubHTTPError, OSError) as e:
            raise ArtifactError(f"cannot read {filename} from {self.ref.store} ({type(e).__name__}: {e}); check the "
                                "network and the repo") from None

    def read_index(self) -> StoreIndex:
        return parse_index(self._download(INDEX_FILE).read_bytes(), self.ref.store)

    def local_file(self, key: str, retry: bool) -> Path | None:
        """The blob, downloaded into (or found in) the Hub cache; `retry` downloads it again."""
        return self._download(blob_path(key), force=retry).resolve()

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        raise NotImplementedError("Hub blobs are fetched whole through local_file")

    def close(self) -> None:
        pass


def open_source(ref: StoreRef, connections: int = 8):
    if ref.kind == "http":
        return HttpSource(ref, connections)
    if ref.kind == "hf":
        return HubSource(ref)
    return LocalSource(ref)

