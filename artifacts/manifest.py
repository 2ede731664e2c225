"""The manifest: what an artifact holds and what it was built from, read and written here only.

An artifact is a directory: `manifest.json`, then per program a package (compiled code, no
weights) and one weights file per rank, and the tokenizer files. Format 3:

    format_version  3
    producer        package version, git sha, torch and triton versions
    target          device type, arch (sm_90, or the CPU's vector ISA), device name, world size
    model, build    the ModelConfig and BuildConfig it was built from; input_hash names its build
    programs        [{name: "step", package: "step.pt2", inputs: [...], weights: [one file per rank]}]
    quantization    how weights and KV cache are quantized ({} for none)
    passes          [{name, phase, matches}] in the order they ran
    verification    the build-time comparison against the eager model
    files           every other file with its digest (artifacts/digest.py)

It is written after every other file, so a directory with a manifest is complete by construction,
and the loader can prove nothing changed since. Meaning is never parsed out of file names: the
program entries name their files.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_aot.artifacts.config import BuildConfig, ModelConfig
from llama_aot.artifacts.errors import ArtifactError, ConfigError

FORMAT_VERSION = 3
MANIFEST_FILE = "manifest.json"
STEP_PROGRAM = "step"
DRAFT_PROGRAM = "draft"
KEYS = ("format_version", "producer", "target", "model", "build", "input_hash", "programs", "quantization",
        "passes", "verification", "files")


@dataclass(frozen=True)
class ProgramSpec:
    """One compiled program: its package, the names of its positional inputs, and its weights
    file for each rank (`weights[r]`)."""

    name: str
    package: str
    inputs: tuple[str, ...]
    weights: tuple[str, ...]

    @classmethod
    def named(cls, name: str, inputs: tuple[str, ...], world_size: int) -> "ProgramSpec":
        """The writer's naming: `NAME.pt2` and `NAME.rank{r}.safetensors`."""
        return cls(name, f"{name}.pt2", tuple(inputs), tuple(f"{name}.rank{r}.safetensors" for r in range(world_size)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "package": self.package, "inputs": list(self.inputs), "weights": list(self.weights)}


@dataclass(frozen=True)
class Manifest:
    producer: dict[str, Any]
    target: dict[str, Any]
    model: ModelConfig
    build: BuildConfig
    input_hash: str
    programs: tuple[ProgramSpec, ...]
    quantization: dict[str, Any]
    passes: tuple[dict[str, Any], ...]
    verification: dict[str, Any]
    files: dict[str, dict]

    @property
    def device_type(self) -> str:
        return self.target["device_type"]

    @property
    def world_size(self) -> int:
        return self.target["world_size"]

    def program(self, name: str) -> ProgramSpec:
        for spec in self.programs:
            if spec.name == name:
                return spec
        raise ArtifactError(f"the artifact has no {name!r} program (it has {[p.name for p in self.programs]}); "
                            "rebuild it with this version of llama-compile")

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "producer": self.producer, "target": self.target,
                "model": self.model.to_dict(), "build": self.build.to_dict(), "input_hash": self.input_hash,
                "programs": [p.to_dict() for p in self.programs], "quantization": self.quantization,
                "passes": list(self.passes), "verification": self.verification, "files": self.files}

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_manifest(path: Path) -> Manifest:
    """The manifest of the artifact at `path`, or an ArtifactError that says what to rebuild."""
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise ArtifactError(f"{path}: not an artifact (no {MANIFEST_FILE}); build one with llama-compile -o {path}")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e}); rebuild the artifact with llama-compile") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format {version}, this runtime reads format {FORMAT_VERSION}; "
                            "rebuild it with this version of llama-compile")
    if sorted(data) != sorted(KEYS):
        raise ArtifactError(f"{mpath}: manifest keys {sorted(data)} are not the expected {sorted(KEYS)}; "
                            "rebuild the artifact")
    try:
        manifest = Manifest(
            producer=data["producer"], target=data["target"], model=ModelConfig.from_dict(data["model"]),
            build=BuildConfig.from_dict(data["build"]), input_hash=data["input_hash"],
            programs=tuple(_program(p) for p in data["programs"]), quantization=data["quantization"],
            passes=tuple(data["passes"]), verification=data["verification"], files=data["files"])
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{mpath}: invalid manifest ({e}); rebuild the artifact") from None
    _check_programs(mpath, manifest)
    return manifest


def _program(entry: dict[str, Any]) -> ProgramSpec:
    fields = {f.name for f in dataclasses.fields(ProgramSpec)}
    if not isinstance(entry, dict) or set(entry) != fields:
        raise ValueError(f"a program entry must have exactly the keys {sorted(fields)}, got {entry!r}")
    return ProgramSpec(entry["name"], entry["package"], tuple(entry["inputs"]), tuple(entry["weights"]))


def _check_programs(mpath: Path, manifest: Manifest) -> None:
    names = [p.name for p in manifest.programs]
    problems = []
    if STEP_PROGRAM not in names or len(set(names)) != len(names):
        problems.append(f"programs {names} must name {STEP_PROGRAM!r} once, and each program once")
    for p in manifest.programs:
        if len(p.weights) != manifest.world_size:
            problems.append(f"program {p.name!r} lists {len(p.weights)} weights files for world size "
                            f"{manifest.world_size}")
        unlisted = [f for f in (p.package, *p.weights) if f not in manifest.files]
        if unlisted:
            problems.append(f"program {p.name!r} names files {unlisted} that `files` does not list")
    if problems:
        raise ArtifactError(f"{mpath}: invalid manifest ({'; '.join(problems)}); rebuild the artifact")


def checked_manifest(path: Path, device: str | None = None) -> tuple[Manifest, str]:
    """The manifest of the artifact at `path` and the device it will run on (default: the device
    type it was built for), once this machine is known to run it; reads no other file. The target
    check imports torch (~2 s), so it is imported here: reading a manifest (pull, publish) does not."""
    from llama_aot.artifacts.target import check_target

    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    manifest = read_manifest(path)
    device = device or manifest.device_type
    check_target(path, manifest.target, manifest.producer["torch"], device)
    return manifest, device
