"""Store references: the REF that `llama-artifacts list|pull` and `llama-serve` accept.

    REF   = STORE [":" NAME] ["@sha256:" DIGEST]
    STORE = a local directory | http(s)://HOST/PATH | hf://ORG/REPO[@REVISION]

`:NAME` picks an artifact by the name it was published under, `@sha256:DIGEST` pins one by
content (the digest `llama-artifacts list` prints); without either, pull picks the build that fits
the machine. A `:` counts as a name only in the last path segment, so `http://host:8000` keeps its
port. Only this module parses REFs; everything else gets a StoreRef.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from llama_aot.artifacts.errors import ArtifactError

INDEX_FILE = "llama-aot-index.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PIN = re.compile(r"@sha256:([0-9a-fA-F]*)$")
_HF = re.compile(r"^hf://([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([^@:]+))?$")


@dataclass(frozen=True)
class StoreRef:
    """A parsed REF: `kind` is "local", "http" or "hf"; `location` the directory, the base URL
    (ending in /) or the repo id; `revision` a Hub branch, tag or commit."""

    kind: str
    location: str
    revision: str | None = None
    name: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        store = self.location if self.kind != "hf" else f"hf://{self.location}"
        if self.kind == "http":
            store = store.rstrip("/")
        if self.revision:
            store += f"@{self.revision}"
        return store + (f":{self.name}" if self.name else "") + (f"@sha256:{self.digest}" if self.digest else "")

    @property
    def store(self) -> str:
        """The store alone, without the artifact's name or digest, for messages."""
        return str(StoreRef(self.kind, self.location, self.revision))


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ArtifactError(f"artifact name {name!r}: use letters, digits, '.', '_' and '-' (at most 128), "
                            "starting with a letter or digit")
    return name


def parse_ref(text: str) -> StoreRef:
    """The StoreRef of `text`, or an ArtifactError that shows the accepted forms."""
    rest, digest = text, None
    if (pin := _PIN.search(rest)) is not None:
        digest = pin.group(1).lower()
        if len(digest) != 64:
            raise ArtifactError(f"{text}: a pinned digest is @sha256: and 64 hex digits, as `llama-artifacts list` "
                                "prints it")
        rest = rest[:pin.start()]
    rest, name = _split_name(rest)
    if name is not None:
        check_name(name)
    if rest.startswith("hf://"):
        match = _HF.match(rest)
        if not match:
            raise ArtifactError(f"{text}: a Hub store is hf://ORG/REPO or hf://ORG/REPO@REVISION")
        return StoreRef("hf", match.group(1), match.group(2), name, digest)
    if rest.startswith(("http://", "https://")):
        if not urlsplit(rest).netloc:
            raise ArtifactError(f"{text}: not a URL of a store (expected http(s)://HOST/PATH)")
        return StoreRef("http", rest.rstrip("/") + "/", None, name, digest)
    if "://" in rest:
        raise ArtifactError(f"{text}: unknown scheme; a store is a directory, an http(s):// URL or hf://ORG/REPO")
    if not rest:
        raise ArtifactError(f"{text!r}: empty store reference")
    return StoreRef("local", str(Path(rest).expanduser()), None, name, digest)


def _split_name(text: str) -> tuple[str, str | None]:
    if text.startswith(("http://", "https://")):
        host_at = text.index("://") + 3
        slash = text.find("/", host_at)  # the path starts after the host and port
        if slash < 0:  # http://HOST:PORT keeps its port; http://HOST:PORT:NAME names an artifact
            host = text[host_at:]
            if ":" in host and not host.endswith("]") and not host.rsplit(":", 1)[1].isdigit():
                return text[:text.rindex(":")], text[text.rindex(":") + 1:]
            return text, None
        head, tail = text[:slash], text[slash:]
    elif text.startswith("hf://"):
        head, tail = "hf://", text[5:]
    else:
        if Path(text).expanduser().exists():  # a directory whose name has a colon is a directory
            return text, None
        head, tail = "", text
    last = tail.rsplit("/", 1)[-1]
    if ":" not in last:
        return text, None
    cut = len(text) - len(last) + last.rindex(":")
    return text[:cut], text[cut + 1:]


def looks_like_store(text: str) -> bool:
    """Whether `llama-serve`'s argument names a store rather than an artifact directory: a URL, an
    hf:// repo, or a directory holding a store index (with a :NAME or @sha256: suffix or not)."""
    if text.startswith(("http://", "https://", "hf://")):
        return True
    if (Path(text) / "manifest.json").is_file():
        return False
    try:
        ref = parse_ref(text)
    except ArtifactError:
        return False
    return ref.kind == "local" and (Path(ref.location) / INDEX_FILE).is_file()
