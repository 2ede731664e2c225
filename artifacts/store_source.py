"""Reading a store: its index and byte ranges of its blobs, from a directory, over HTTP, or
from a Hugging Face Hub repo.

HTTP sources ask for byte ranges (`Range: bytes=A-B`), so that pull can fetch one file over several
connections and resume a cut transfer where it stopped. A Hub repo goes through huggingface_hub,
which brings the Hub's auth, its CDN and Xet transfers, its own resume, and `HF_HUB_OFFLINE` with
its cache; pull then links the file out of the Hub cache rather than copying it.

HTTP goes through urllib3, whose `readinto` reads the caller's buffer (pull's 256 KiB) in one call
to the socket, the GIL released while it waits. httpx hands a body out in 64 KiB pieces through a
stack of Python generators, ~0.8 s of CPU per GB under the GIL that all connections share; with
torch imported meanwhile, that held pull to a quarter of curl's speed on 16 cores
(docs/distribution.md, "Pull speed"). What httpx did besides is kept: connections kept alive and
reused, redirects followed, `user:password@` in the URL, HTTP_PROXY / HTTPS_PROXY / NO_PROXY.

Errors a user can fix are ArtifactErrors (unreachable, not a store, a blob missing); a transfer
that stops mid-way raises TransferCut, which pull retries from where it stopped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator
from urllib.parse import SplitResult, unquote, urlsplit
from urllib.request import getproxies, proxy_bypass

from llama_aot.artifacts.errors import ArtifactError
from llama_aot.artifacts.store_index import StoreIndex, parse_index
from llama_aot.artifacts.store_ref import INDEX_FILE, StoreRef

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
MAX_REDIRECTS = 5
USER_AGENT = "llama-artifacts"


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

    def read_range(self, key: str, start: int, end: int, buffer: memoryview) -> Iterator[memoryview]:
        """The bytes [start, end) of a blob, each piece read into `buffer` and valid until the next
        is asked for (a source never allocates per piece); fewer if the blob ends first."""
        path = self.root / blob_path(key)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise BlobMissing(f"{self.ref.store}: blob {key} is missing; republish the artifact") from None
        with f:
            f.seek(start)
            while start < end and (n := f.readinto(buffer[:min(len(buffer), end - start)])):
                start += n
                yield buffer[:n]

    def close(self) -> None:
        pass


def _pool(base: str):
    """A urllib3 pool for the store at `base`: through the proxy that HTTP_PROXY / HTTPS_PROXY name
    unless NO_PROXY exempts the host, as curl and httpx do (urllib3 reads no environment)."""
    import urllib3

    url = urlsplit(base)
    timeout = urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if url.username:
        headers.update(urllib3.make_headers(basic_auth=_credentials(url)))
    # Redirects followed (the Authorization header dropped on a move to another host); no other
    # retries here: pull resumes a cut transfer itself, from the bytes it has.
    retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=MAX_REDIRECTS)
    proxy = None if proxy_bypass(url.hostname or "") else getproxies().get(url.scheme)
    if proxy:
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        auth = urllib3.make_headers(proxy_basic_auth=_credentials(p)) if p.username else {}
        return urllib3.ProxyManager(proxy, proxy_headers=auth, headers=headers, timeout=timeout, retries=retries)
    return urllib3.PoolManager(headers=headers, timeout=timeout, retries=retries)


class HttpSource:
    """A store served over HTTP(S) by any static file host that honours range requests."""

    whole_files = False

    def __init__(self, ref: StoreRef):
        import urllib3

        self.ref, self.urllib3 = ref, urllib3
        self.base = _without_credentials(ref.location)
        self.pool = _pool(ref.location)

    def _unreachable(self, e: Exception) -> ArtifactError:
        return ArtifactError(f"cannot reach the store at {self.ref.store} ({type(e).__name__}: {e}); check the URL "
                             "and that its server is up")

    def _get(self, url: str, headers: dict[str, str] | None = None):
        """The response to GET `url` (redirects followed), its body not yet read; a server that
        cannot be reached makes the store unreachable."""
        errors = self.urllib3.exceptions
        try:
            return self.pool.request("GET", url, headers=headers, preload_content=False, decode_content=False)
        except errors.MaxRetryError as e:
            if isinstance(e.reason, (errors.NewConnectionError, errors.ConnectTimeoutError, errors.ProxyError)):
                raise self._unreachable(e.reason) from None
            if isinstance(e.reason, errors.ResponseError):  # too many redirects
                raise ArtifactError(f"{self.ref.store}: more than {MAX_REDIRECTS} redirects from {url}; "
                                    "check the URL") from None
            raise TransferCut(f"{type(e.reason).__name__}: {e.reason}") from None
        except errors.HTTPError as e:
            raise TransferCut(f"{type(e).__name__}: {e}") from None

    def read_index(self) -> StoreIndex:
        url = self.base + INDEX_FILE
        try:
            response = self._get(url)
            body = response.read()
            response.release_conn()
        except (TransferCut, self.urllib3.exceptions.HTTPError) as e:
            raise self._unreachable(e) from None
        if response.status == 404:
            raise ArtifactError(f"{self.ref.store}: not a store (no {INDEX_FILE} at {url}); check the URL")
        if response.status != 200:
            raise ArtifactError(f"{url}: HTTP {response.status}; check the URL and the server")
        return parse_index(body, self.ref.store)

    def read_range(self, key: str, start: int, end: int, buffer: memoryview) -> Iterator[memoryview]:
        """The bytes [start, end) of a blob, read into `buffer` (see LocalSource.read_range). A
        server that ignores Range (a 200 with the whole file) is refused past the first chunk:
        skipping to each chunk would fetch a 16 GB file a thousand times over."""
        url = self.base + blob_path(key)
        response = self._get(url, {"Range": f"bytes={start}-{end - 1}"})
        try:
            if response.status == 404:
                raise BlobMissing(f"{self.ref.store}: blob {key} is missing ({url}: 404); republish the artifact")
            if response.status == 416:
                return  # the blob is shorter than the index says: pull refuses it as corrupt
            if response.status not in (200, 206):
                raise ArtifactError(f"{url}: HTTP {response.status}; check the store's server")
            if response.status == 200 and start > 0:
                raise ArtifactError(f"{self.ref.store}: the server ignores range requests (HTTP 200 for a range); "
                                    "serve the store with one that honours them (nginx, caddy, S3, uvicorn with "
                                    "starlette's StaticFiles)")
            content_range = response.headers.get("content-range", "")
            if response.status == 206 and not content_range.startswith(f"bytes {start}-"):
                raise ArtifactError(f"{url}: the server answered the range from byte {start} with "
                                    f"{content_range!r}; check the store's server")
            while start < end:
                try:  # urllib3 raises when the body stops short of its Content-Length
                    n = response.readinto(buffer[:min(len(buffer), end - start)])
                except (OSError, self.urllib3.exceptions.HTTPError) as e:
                    raise TransferCut(f"{type(e).__name__}: {e}") from None
                if not n:
                    return
                yield buffer[:n]
                start += n
        finally:
            if response.length_remaining == 0:  # read to its end: the connection serves the next range
                response.release_conn()
            else:
                response.close()

    def close(self) -> None:
        self.pool.clear()


def _credentials(url: SplitResult) -> str:
    """`user:password` from a URL's userinfo, percent-decoded, for a basic-auth header."""
    return f"{unquote(url.username)}:{unquote(url.password or '')}"


def _without_credentials(location: str) -> str:
    """`location` without `user:password@`: the pool sends them as a header."""
    url = urlsplit(location)
    return url._replace(netloc=url.netloc.rpartition("@")[2]).geturl()


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


def open_source(ref: StoreRef):
    if ref.kind == "http":
        return HttpSource(ref)
    if ref.kind == "hf":
        return HubSource(ref)
    return LocalSource(ref)

