"""Writing an artifact's files besides the programs: the tokenizer, and the manifest last.

The manifest (artifacts/manifest.py) is written after every other file, with each file's digest
(artifacts/digest.py), so a directory with a manifest is complete by construction and the loader
can prove nothing changed since.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from llama_aot.artifacts.config import BuildConfig, ModelConfig
from llama_aot.artifacts.digest import hash_files
from llama_aot.artifacts.manifest import MANIFEST_FILE, Manifest, ProgramSpec
from llama_aot.artifacts.target import describe_host


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


def write_manifest(out_dir: Path, *, model: ModelConfig, build: BuildConfig, input_hash: str,
                   programs: list[ProgramSpec], quantization: dict, passes: list[dict],
                   verification: dict) -> Manifest:
    """Hashes every file now in `out_dir` and writes the manifest over them; returns it."""
    names = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    target = {**describe_host(build.target), "world_size": build.tp}
    manifest = Manifest(producer=producer(), target=target, model=model, build=build, input_hash=input_hash,
                        programs=tuple(programs), quantization=quantization, passes=tuple(passes),
                        verification=verification, files=hash_files(out_dir, names))
    manifest.write(out_dir)
    return manifest
