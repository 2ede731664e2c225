"""llama-artifacts and `llama-serve REF`: publish, list, pull by hardware, verify, against a real
HTTP server on loopback.

The server is uvicorn serving the store with starlette's StaticFiles, which honours Range requests
(206, checked below). A thin ASGI wrapper counts the bytes it serves per path, and can cut a
response at a given byte offset or flip a byte in one, so the tests can show what a resumed pull
did not fetch again; it also redirects what is asked under /moved/, and notes the credentials.
The other builds in the store are the session's tiny artifact with its manifest edited (another
arch, another world size, a GPU); nothing new is compiled.
"""
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from llama_aot.artifacts.digest import hash_file
from llama_aot.artifacts.errors import ArtifactError
from llama_aot.artifacts.store_cli import main
from llama_aot.artifacts.store_ref import INDEX_FILE, looks_like_store, parse_ref
from llama_aot.bench.server_process import free_port
from server import ServerProcess

PROG = "llama-artifacts: error:"


class StoreServer:
    """uvicorn + StaticFiles over `root` in a background thread, with byte counts and faults."""

    def __init__(self, root: Path):
        import uvicorn
        from starlette.staticfiles import StaticFiles

        self.root, self.files = root, StaticFiles(directory=root)
        self.served: dict[str, int] = {}
        self.cut: dict[str, list] = {}  # path -> [byte offset, responses to cut (-1: all)]
        self.corrupt: dict[str, int] = {}  # path -> responses to corrupt
        self.authorizations: set[str] = set()  # the Authorization headers received
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, lifespan="off",
                                                    interface="asgi3", log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started, "the store server did not start"

    def blob_served(self, key: str) -> int:
        return self.served.get(f"/blobs/{key}", 0)

    async def app(self, scope, receive, send):
        path, headers = scope["path"], dict(scope["headers"])
        if b"authorization" in headers:
            self.authorizations.add(headers[b"authorization"].decode())
        if path.startswith("/moved/"):  # the store moved to the root
            await send({"type": "http.response.start", "status": 307,
                        "headers": [(b"location", path.removeprefix("/moved").encode()), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        ranges = headers.get(b"range", b"bytes=0-").decode()
        offset = int(ranges.split("=")[1].split("-")[0])
        cut = self.cut.get(path)
        corrupt = self.corrupt.get(path, 0) != 0
        if corrupt:
            self.corrupt[path] -= 1

        async def counted(message):
            nonlocal offset, corrupt
            if message["type"] == "http.response.body" and message.get("body"):
                body = message["body"]
                if corrupt:
                    body, corrupt = bytes([body[0] ^ 0xFF]) + body[1:], False
                if cut and cut[1] != 0 and offset + len(body) > cut[0]:
                    body = body[:max(0, cut[0] - offset)]
                    self.served[path] = self.served.get(path, 0) + len(body)
                    await send({**message, "body": body, "more_body": True})
                    cut[1] -= 1
                    raise ConnectionAbortedError("cut by the test")
                offset += len(body)
                self.served[path] = self.served.get(path, 0) + len(body)
                message = {**message, "body": body}
            await send(message)

        await self.files(scope, receive, counted)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty pull cache for each test (LLAMA_AOT_CACHE), so byte counts start from nothing."""
    monkeypatch.setenv("LLAMA_AOT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "artifacts"


def variant(tiny: Path, out: Path, *, arch=None, device=None, world_size=None, torch=None) -> Path:
    """A copy of the tiny artifact whose manifest claims another target; world size N gets N rank
    files (identical bytes, so the store keeps one blob)."""
    shutil.copytree(tiny, out)
    manifest = json.loads((out / "manifest.json").read_text())
    target = manifest["target"]
    if device:
        target["device_type"] = device
    if arch:
        target["arch"] = arch
    if torch:
        manifest["producer"]["torch"] = torch
    if world_size:
        target["world_size"] = world_size
        step = manifest["programs"][0]
        for r in range(1, world_size):
            name = f"step.rank{r}.safetensors"
            shutil.copyfile(out / step["weights"][0], out / name)
            step["weights"].append(name)
            manifest["files"][name] = manifest["files"][step["weights"][0]]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def publish(capsys, artifact: Path, store: Path, name: str | None = None) -> str:
    assert main(["publish", str(artifact), str(store), *(["--name", name] if name else [])]) == 0
    return capsys.readouterr().out


def refused(capsys, argv, *needles) -> str:
    """The one error line of a refused llama-artifacts command (exit 2, no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(PROG)]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_nothing_left(dest: Path, cache: Path | None = None):
    """No destination and no staging directory beside it; no partial blob in the cache."""
    assert not dest.exists()
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]
    if cache is not None and (cache / "blobs").is_dir():
        assert not [p for p in (cache / "blobs").iterdir() if ".part" in p.name]


def index_of(store: Path) -> dict:
    return json.loads((store / INDEX_FILE).read_text())


def key_of(store: Path, name: str, file: str) -> str:
    return index_of(store)["artifacts"][name]["files"][file]["root_sha256"]


@pytest.fixture(scope="module")
def store(tiny_artifact, tmp_path_factory) -> Path:
    """A store with the tiny artifact and three builds this machine cannot run."""
    from llama_aot.artifacts.publish import publish as publish_

    work = tmp_path_factory.mktemp("variants")
    root = work / "store"
    publish_(tiny_artifact, str(root), "tiny")
    publish_(variant(tiny_artifact, work / "tiny-arm", arch="aarch64-asimd"), str(root))
    publish_(variant(tiny_artifact, work / "tiny-tp2", world_size=2), str(root))
    publish_(variant(tiny_artifact, work / "tiny-h100", device="cuda", arch="sm_90"), str(root))
    return root


@pytest.fixture
def served(store, tmp_path):
    """The module's store (copied, so a test may damage it) on a loopback HTTP server."""
    copy = shutil.copytree(store, tmp_path / "store")
    server = StoreServer(copy)
    yield server
    server.stop()


def test_the_server_honours_range_requests(served):
    key = key_of(served.root, "tiny", "step.pt2")
    r = httpx.get(f"{served.url}/blobs/{key}", headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and len(r.content) == 100
    assert r.headers["content-range"].startswith("bytes 100-199/")
    assert r.content == (served.root / "blobs" / key).read_bytes()[100:200]


def test_refs_parse():
    assert parse_ref("http://127.0.0.1:8000").location == "http://127.0.0.1:8000/"
    assert parse_ref("http://127.0.0.1:8000").name is None
    ref = parse_ref("http://127.0.0.1:8000/store/:tiny")
    assert (ref.kind, ref.location, ref.name) == ("http", "http://127.0.0.1:8000/store/", "tiny")
    ref = parse_ref("hf://org/repo@v1:tiny@sha256:" + "a" * 64)
    assert (ref.kind, ref.location, ref.revision, ref.name, ref.digest) == ("hf", "org/repo", "v1", "tiny", "a" * 64)
    assert parse_ref("hf://org/repo").revision is None
    with pytest.raises(ArtifactError, match="64 hex digits"):
        parse_ref("hf://org/repo@sha256:abc")
    with pytest.raises(ArtifactError, match="hf://ORG/REPO"):
        parse_ref("hf://justrepo")
    assert looks_like_store("https://example.com/s") and not looks_like_store("artifacts/default")
    from llama_aot.artifacts import manifest, store_index

    assert store_index.MANIFEST_FILE == manifest.MANIFEST_FILE


def test_publish_stores_each_file_once_and_list_marks_what_fits(capsys, store, tiny_artifact, tmp_path):
    entries = index_of(store)["artifacts"]
    assert sorted(entries) == ["tiny", "tiny-arm", "tiny-h100", "tiny-tp2"]
    assert entries["tiny"]["digest"] == "sha256:" + hash_file(tiny_artifact / "manifest.json")["root_sha256"]
    assert entries["tiny-tp2"]["target"]["world_size"] == 2
    # Five files shared by every build and rank, plus one manifest each.
    assert len(list((store / "blobs").iterdir())) == 5 + 4
    again = tmp_path / "again"
    out = publish(capsys, tiny_artifact, shutil.copytree(store, again), "tiny-copy")
    assert "0 new blobs" in out

    server = StoreServer(store)
    try:
        assert main(["list", server.url]) == 0
    finally:
        server.stop()
    lines = {line[2:].split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["tiny"].startswith("* ") and "fits, pull picks it" in lines["tiny"]
    assert "does not fit: built for CPU arch aarch64-asimd" in lines["tiny-arm"]
    assert "does not fit: built for --tp 2" in lines["tiny-tp2"]
    assert "does not fit: built for a CUDA GPU (sm_90), this machine has none" in lines["tiny-h100"]


def test_pull_picks_the_build_this_machine_runs(capsys, served, cache, tmp_path, tiny_artifact):
    dest = tmp_path / "out" / "tiny"
    assert main(["pull", served.url, "-o", str(dest)]) == 0
    assert "pulled tiny (sha256:" in capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in tiny_artifact.iterdir())
    assert hash_file(dest / "manifest.json") == hash_file(tiny_artifact / "manifest.json")
    assert main(["verify", str(dest)]) == 0
    assert "6 files match" in capsys.readouterr().out and oct(dest.stat().st_mode)[-3:] == "755"
    # Asking for two ranks picks the world-size-2 build.
    tp2 = tmp_path / "out" / "tp2"
    assert main(["pull", served.url, "--tp", "2", "-o", str(tp2)]) == 0
    assert json.loads((tp2 / "manifest.json").read_text())["target"]["world_size"] == 2


def test_a_store_with_nothing_for_this_machine_is_refused_with_the_reasons(capsys, served, cache, tmp_path):
    index = index_of(served.root)
    del index["artifacts"]["tiny"]
    (served.root / INDEX_FILE).write_text(json.dumps(index))
    dest = tmp_path / "out"
    line = refused(capsys, ["pull", served.url, "-o", str(dest)], "no artifact in", "fits this machine",
                   "tiny-arm (cpu aarch64-asimd", "built for CPU arch aarch64-asimd",
                   "tiny-tp2 (", "built for --tp 2", "tiny-h100 (cuda sm_90", "this machine has none",
                   "build one here with: llama-compile --model HF_CHECKPOINT_DIR --target cpu -o artifacts/NAME")
    assert "\n" not in line
    assert_nothing_left(dest)
    assert served.served == {f"/{INDEX_FILE}": len((served.root / INDEX_FILE).read_bytes())}  # only the index


def test_a_cut_transfer_resumes_without_fetching_again_what_it_has(capsys, served, cache, tmp_path):
    key = key_of(served.root, "tiny", "step.pt2")
    size = (served.root / "blobs" / key).stat().st_size
    served.cut[f"/blobs/{key}"] = [size // 2, -1]  # every response dropped at the middle: the pull gives up
    dest = tmp_path / "out"
    refused(capsys, ["pull", served.url, "-o", str(dest)], "the transfer of step.pt2", "was cut",
            "run the same command again to resume")
    assert not dest.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert served.blob_served(key) == size // 2
    assert (cache / "blobs" / f"{key}.part").is_file()

    del served.cut[f"/blobs/{key}"]
    assert main(["pull", served.url, "-o", str(dest)]) == 0
    assert served.blob_served(key) == size  # the second half only
    assert hash_file(dest / "step.pt2")["root_sha256"] == key
    files = index_of(served.root)["artifacts"]["tiny"]["files"]
    assert all(served.blob_served(d["root_sha256"]) == d["size"] for d in files.values())
    assert_nothing_left(tmp_path / "absent", cache)


def test_a_connection_dropped_once_is_resumed_in_the_same_run(capsys, served, cache, tmp_path):
    key = key_of(served.root, "tiny", "step.pt2")
    size = (served.root / "blobs" / key).stat().st_size
    served.cut[f"/blobs/{key}"] = [size // 3, 1]
    assert main(["pull", served.url, "-o", str(tmp_path / "out")]) == 0
    assert served.blob_served(key) == size


def test_a_corrupt_blob_is_fetched_once_more_then_refused(capsys, served, cache, tmp_path):
    key = key_of(served.root, "tiny", "step.rank0.safetensors")
    blob = served.root / "blobs" / key
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    dest = tmp_path / "out"
    refused(capsys, ["pull", served.url, "-o", str(dest)], "step.rank0.safetensors", f"blob {key[:12]}",
            "does not match its sha256, twice", "republish")
    assert served.blob_served(key) == 2 * len(data)
    assert_nothing_left(dest, cache)
    assert not (cache / "blobs" / key).exists()


def test_a_blob_damaged_in_transit_once_is_fetched_again(capsys, served, cache, tmp_path):
    key = key_of(served.root, "tiny", "step.pt2")
    served.corrupt[f"/blobs/{key}"] = 1
    assert main(["pull", served.url, "-o", str(tmp_path / "out")]) == 0
    assert served.blob_served(key) == 2 * (served.root / "blobs" / key).stat().st_size
    assert hash_file(tmp_path / "out" / "step.pt2")["root_sha256"] == key


def test_a_tampered_index_is_refused(capsys, served, cache, tmp_path):
    dest = tmp_path / "out"
    index = index_of(served.root)
    # The arm build claimed to be this machine's: its manifest says otherwise.
    tampered = json.loads(json.dumps(index))
    tampered["artifacts"]["tiny-arm"]["target"] = tampered["artifacts"]["tiny"]["target"]
    (served.root / INDEX_FILE).write_text(json.dumps(tampered))
    refused(capsys, ["pull", served.url + ":tiny-arm", "-o", str(dest)],
            "the index entry of tiny-arm disagrees with its manifest", "target.arch", "republish")
    assert_nothing_left(dest, cache)
    # A file's digest swapped for another blob's.
    tampered = json.loads(json.dumps(index))
    files = tampered["artifacts"]["tiny"]["files"]
    files["step.pt2"] = files["tokenizer.json"]
    (served.root / INDEX_FILE).write_text(json.dumps(tampered))
    refused(capsys, ["pull", served.url + ":tiny", "-o", str(dest)], "disagrees with its manifest", "step.pt2")
    assert_nothing_left(dest, cache)
    # Not an index at all.
    (served.root / INDEX_FILE).write_text('{"artifacts": [')
    refused(capsys, ["pull", served.url, "-o", str(dest)], "malformed store index", "not JSON")
    assert_nothing_left(dest, cache)


def test_a_pinned_digest_pulls_that_build_or_is_refused(capsys, served, cache, tmp_path):
    index = index_of(served.root)["artifacts"]
    arm = index["tiny-arm"]["digest"]
    dest = tmp_path / "arm"
    assert main(["pull", f"{served.url}@{arm}", "-o", str(dest)]) == 0  # pinned: no fit check
    assert hash_file(dest / "manifest.json")["root_sha256"] == arm[7:]
    line = refused(capsys, ["pull", f"{served.url}:tiny@{arm}", "-o", str(tmp_path / "x")],
                   f"{served.url}:tiny is {index['tiny']['digest']}, not the pinned {arm}")
    assert "tiny-arm" not in line.split(" is ")[0]
    refused(capsys, ["pull", f"{served.url}@sha256:{'0' * 64}", "-o", str(tmp_path / "x")],
            f"no artifact in {served.url} has the pinned digest sha256:{'0' * 64}", "tiny sha256:")
    assert_nothing_left(tmp_path / "x", cache)


def test_a_stopped_server_is_a_clear_error_at_once(capsys, served, cache, tmp_path):
    served.stop()
    start = time.monotonic()
    refused(capsys, ["pull", served.url, "-o", str(tmp_path / "out")], f"cannot reach the store at {served.url}",
            "check the URL and that its server is up")
    assert time.monotonic() - start < 10
    assert_nothing_left(tmp_path / "out", cache)


def test_blobs_already_pulled_are_linked_not_fetched(capsys, served, cache, tmp_path):
    assert main(["pull", served.url + ":tiny", "-o", str(tmp_path / "a")]) == 0
    before = dict(served.served)
    assert main(["pull", served.url + ":tiny-tp2", "-o", str(tmp_path / "b")]) == 0
    fetched = {p: n - before.get(p, 0) for p, n in served.served.items() if n != before.get(p, 0)}
    tp2_manifest = key_of(served.root, "tiny-tp2", "manifest.json")
    assert set(fetched) == {f"/{INDEX_FILE}", f"/blobs/{tp2_manifest}"}  # every other file was in the cache
    weights = tmp_path / "b" / "step.rank1.safetensors"
    assert weights.stat().st_ino == (tmp_path / "a" / "step.rank0.safetensors").stat().st_ino
    assert main(["pull", served.url + ":tiny", "-o", str(tmp_path / "a")]) == 0
    assert "already holds tiny" in capsys.readouterr().out


def test_a_pull_by_name_does_not_import_torch(served, tmp_path):
    """Importing torch holds the GIL for ~2 s, which every download thread waits on (docs/distribution.md,
    "Pull speed"); only choosing a build by this machine's hardware needs it."""
    code = ("import sys; from llama_aot.artifacts.store_cli import main; "
            "assert main(['pull', sys.argv[1], '-o', sys.argv[2]]) == 0; assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code, f"{served.url}:tiny", str(tmp_path / "out")],
                          env={**os.environ, "LLAMA_AOT_CACHE": str(tmp_path / "cache")}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_redirect_a_proxy_and_credentials_in_the_url_are_honoured(capsys, served, cache, tmp_path, monkeypatch):
    """As with curl: a host that redirects every request (307); the proxy HTTP_PROXY names (the
    test server answers the whole-URL requests a proxy gets as it would pass them on); and
    user:password@ in the URL, sent as basic auth."""
    assert main(["pull", f"{served.url}/moved:tiny", "-o", str(tmp_path / "a")]) == 0
    assert served.blob_served(key_of(served.root, "tiny", "step.pt2")) > 0
    monkeypatch.setenv("LLAMA_AOT_CACHE", str(tmp_path / "another-cache"))
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", served.url)
    assert main(["pull", "http://user:s%40cret@store.invalid/:tiny", "-o", str(tmp_path / "b")]) == 0
    assert served.authorizations == {"Basic " + base64.b64encode(b"user:s@cret").decode()}
    assert hash_file(tmp_path / "b" / "manifest.json") == hash_file(tmp_path / "a" / "manifest.json")


def test_verify_names_a_modified_file(capsys, served, cache, tmp_path):
    dest = tmp_path / "out"
    assert main(["pull", served.url, "-o", str(dest)]) == 0
    target = dest / "tokenizer_config.json"
    text = target.read_text()
    target.unlink()  # a hard link to the cache's blob: replace it, as an editor would
    target.write_text(text.replace("{", "{ ", 1))
    refused(capsys, ["verify", str(dest)], "tokenizer_config.json does not match the sha256")
    refused(capsys, ["verify", str(tmp_path / "nothing")], "no such artifact directory")


def test_publish_refusals(capsys, tiny_artifact, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    refused(capsys, ["publish", str(tiny_artifact), str(tmp_path / "full")], "is not a store")
    refused(capsys, ["publish", str(tiny_artifact), "http://127.0.0.1:1/s"], "read-only")
    refused(capsys, ["publish", str(tmp_path / "full"), str(tmp_path / "s")], "not an artifact")
    refused(capsys, ["pull", "ftp://x/y"], "unknown scheme")


class FakeHub:
    """Stands in for huggingface_hub.HfApi on the publishing side, which needs the Hub: a commit
    lands in a Hugging Face cache laid out as huggingface_hub lays it out (refs/, snapshots/), which
    the real huggingface_hub then reads with HF_HUB_OFFLINE=1."""

    def __init__(self, cache: Path):
        self.cache, self.commits = cache, []

    def _repo(self, repo_id):
        return self.cache / f"models--{repo_id.replace('/', '--')}"

    def _head(self, repo_id):
        return (self._repo(repo_id) / "refs" / "main").read_text()

    def create_repo(self, repo_id, exist_ok=False):
        if not (self._repo(repo_id) / "refs" / "main").exists():
            self._commit(repo_id, {".gitattributes": b""})

    def _commit(self, repo_id, files: dict[str, bytes]):
        repo = self._repo(repo_id)
        old = self._head(repo_id) if (repo / "refs" / "main").exists() else None
        sha = hashlib.sha1(repr((old, sorted(files))).encode()).hexdigest()
        if old:
            shutil.copytree(repo / "snapshots" / old, repo / "snapshots" / sha, copy_function=os.link)
        for path, data in files.items():
            (repo / "snapshots" / sha / path).parent.mkdir(parents=True, exist_ok=True)
            (repo / "snapshots" / sha / path).unlink(missing_ok=True)
            (repo / "snapshots" / sha / path).write_bytes(data)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        return sha

    def repo_info(self, repo_id, revision=None):
        return SimpleNamespace(sha=revision if revision and len(revision) == 40 else self._head(repo_id))

    def list_repo_files(self, repo_id, revision=None):
        snap = self._repo(repo_id) / "snapshots" / revision
        return [str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()]

    def hf_hub_download(self, repo_id, filename, revision=None):
        return str(self._repo(repo_id) / "snapshots" / revision / filename)

    def create_commit(self, repo_id, operations, commit_message, revision=None, parent_commit=None):
        assert parent_commit == self._head(repo_id), "a publisher raced this one"
        files = {}
        for op in operations:
            with op.as_file() as f:
                files[op.path_in_repo] = f.read()
        self.commits.append(sorted(files))
        return self._commit(repo_id, files)


def test_hub_publish_and_offline_pull(capsys, store, tiny_artifact, tmp_path):
    """Publishing builds one Hub commit with only the blobs the repo lacks; pulling goes through
    the real huggingface_hub, offline, from its cache. Not covered without the Hub: the upload
    itself (LFS/Xet), auth, a rejected parent_commit, and the download from the network."""
    from llama_aot.artifacts.publish import publish as publish_

    hub = FakeHub(tmp_path / "hf")
    publish_(tiny_artifact, "hf://org/tiny-aot", "tiny", hub_api=hub)
    publish_(variant(tiny_artifact, tmp_path / "tiny-arm", arch="aarch64-asimd"), "hf://org/tiny-aot", hub_api=hub)
    assert len(hub.commits[0]) == 6 + 1 and INDEX_FILE in hub.commits[0]  # 6 blobs and the index
    arm_manifest = key_of(store, "tiny-arm", "manifest.json")
    assert hub.commits[1] == sorted([f"blobs/{arm_manifest}", INDEX_FILE])  # only what was new

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"),
           "LLAMA_AOT_CACHE": str(tmp_path / "cache")}
    exe = [sys.executable, "-m", "llama_aot.artifacts.store_cli"]
    dest = tmp_path / "pulled"
    done = subprocess.run([*exe, "pull", "hf://org/tiny-aot", "-o", str(dest)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert hash_file(dest / "manifest.json") == hash_file(tiny_artifact / "manifest.json")
    blob = tmp_path / "cache" / "artifacts" / "blobs" / key_of(store, "tiny", "step.pt2")
    assert blob.stat().st_ino == (dest / "step.pt2").stat().st_ino
    hub_copy = next((tmp_path / "hf").rglob(f"blobs/{blob.name}"))
    assert hub_copy.stat().st_ino == blob.stat().st_ino  # linked out of the Hub cache, not copied
    missing = subprocess.run([*exe, "pull", "hf://org/other", "-o", str(tmp_path / "x")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "is not in the Hugging Face cache" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr


def test_llama_serve_pulls_a_url_and_answers_the_openai_client(store, tmp_path, monkeypatch):
    from openai import OpenAI

    monkeypatch.setenv("LLAMA_AOT_CACHE", str(tmp_path / "cache"))
    server = StoreServer(store)
    try:
        proc = ServerProcess(f"{server.url}/")
        try:
            client = OpenAI(base_url=proc.base_url + "/v1", api_key="unused")
            assert [m.id for m in client.models.list().data] == ["tiny"]
            reply = client.chat.completions.create(model="tiny", max_tokens=4,
                                                   messages=[{"role": "user", "content": "Hi!"}])
            assert reply.usage.completion_tokens > 0
        finally:
            assert proc.stop() in (0, -15)
    finally:
        server.stop()
    digest = key_of(store, "tiny", "manifest.json")
    assert (tmp_path / "cache" / "artifacts" / "pulled" / digest / "tiny" / "manifest.json").is_file()


def test_llama_serve_refuses_an_unreachable_store_in_one_line(capsys, tmp_path, monkeypatch):
    from llama_aot.serve.cli import main as serve

    monkeypatch.setenv("LLAMA_AOT_CACHE", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{free_port()}/store"
    assert serve([url, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama-serve: error: cannot reach the store at") and err.count("\n") == 1, err
