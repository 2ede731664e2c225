"""Writing an artifact's files: weights per rank, the tokenizer, and the manifest last.

The manifest is written after every other file, with each file's size and chunked sha256
(runtime/weights_loader.py documents the format; the loader checks with the same `hash_file`), so
a directory with a manifest is complete by construction and the loader can prove nothing changed
since.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from llama_aot.runtime.artifact import FORMAT_VERSION, TIED_WEIGHTS_KEY, describe_host, hash_files, weights_file


def write_weights(out_dir: Path, constants: dict[str, torch.Tensor], rank: int = 0) -> str:
    """Saves each distinct tensor once; names that share storage with an earlier one (tied
    embeddings) are recorded as aliases, since safetensors refuses shared storage."""
    unique, tied, seen = {}, {}, {}
    for name in sorted(constants):
        t = constants[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.contiguous().cpu()
    name = weights_file(rank)
    save_file(unique, str(out_dir / name), metadata={TIED_WEIGHTS_KEY: json.dumps(tied)})
    return name


def copy_tokenizer(files: dict[str, Path], out_dir: Path) -> list[str]:
    for name, src in files.items():
        shutil.copyfile(src, out_dir / name)
    return sorted(files)


def producer() -> dict:
    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = None
    return {"package": "llama-aot", "version": metadata.version("llama-aot"), "git_sha": git_sha(),
            "torch": torch.__version__, "triton": triton_version}


def git_sha() -> str:
    """The source tree's commit, marked `-dirty` when it has uncommitted changes; `unknown`
    outside a git checkout (an installed wheel). LLAMA_AOT_GIT_SHA overrides it, for copies of a
    checkout without its .git (the GPU machine gets the working tree only)."""
    if os.environ.get("LLAMA_AOT_GIT_SHA"):
        return os.environ["LLAMA_AOT_GIT_SHA"]
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def write_manifest(out_dir: Path, *, model: dict, build: dict, passes: list[dict], verification: dict,
                   world_size: int = 1) -> dict:
    names = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != "manifest.json")
    target = describe_host(build["target"])
    target["world_size"] = world_size
    manifest = {
        "format_version": FORMAT_VERSION,
        "producer": producer(),
        "target": target,
        "model": model,
        "build": build,
        "passes": passes,
        "verification": verification,
        "files": hash_files(out_dir, names),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
