"""Loading a verified artifact onto a device: its manifest checked, its files proven, its programs
ready to run.

The checks run in order of cost: the manifest's shape, the target and toolchain, then every file's
digest, so a wrong artifact fails fast and a tampered one never runs. Small files are hashed up
front; a rank's weights file is verified as it is streamed into memory (runtime/weights_loader.py),
so its bytes are read from disk once. Each refusal says what to rebuild.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import llama_aot.kernels.ops  # noqa: F401  (the programs call torch.ops.llama_aot)
from llama_aot.kernels import cpu_kernels
from llama_aot.artifacts.config import BuildConfig, ModelConfig
from llama_aot.artifacts.digest import DigestMismatch, check_files, mismatch_message
from llama_aot.artifacts.errors import ArtifactError
from llama_aot.artifacts.manifest import DRAFT_PROGRAM, STEP_PROGRAM, Manifest, ProgramSpec, checked_manifest
from llama_aot.artifacts.program import attach_weights, load_package
from llama_aot.artifacts.step_abi import DRAFT_INPUTS, STEP_INPUTS
from llama_aot.artifacts.weights_file import restore_ties
from llama_aot.runtime.weights_loader import load_safetensors

# What this runtime calls each program with; a program built for other inputs must be rebuilt.
PROGRAM_INPUTS = {STEP_PROGRAM: STEP_INPUTS, DRAFT_PROGRAM: DRAFT_INPUTS}


@dataclass
class Artifact:
    """An artifact loaded for one rank: `programs` by name, each called as the step ABI says.

    It owns `weights`: the programs were given them as user-managed constants, so they read their
    memory without holding a reference of their own. `load_seconds` splits the load into its
    stages (checking the other files, loading the programs, reading the weights), which start-up
    reports."""

    path: Path
    manifest: Manifest
    rank: int
    programs: dict[str, Any]
    weights: dict[str, dict[str, torch.Tensor]]
    load_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def model_config(self) -> ModelConfig:
        return self.manifest.model

    @property
    def build_config(self) -> BuildConfig:
        return self.manifest.build

    @property
    def device_type(self) -> str:
        """The device type it was built for, and loaded onto unless the caller chose another."""
        return self.manifest.device_type

    @property
    def step(self):
        """The step program: `step(*inputs, kv_cache) -> logits` (artifacts/step_abi.py)."""
        return self.programs[STEP_PROGRAM]

    @property
    def weight_bytes(self) -> int:
        """Bytes of distinct weight tensors across programs (tied names share one)."""
        unique = {id(t): t for weights in self.weights.values() for t in weights.values()}.values()
        return sum(t.numel() * t.element_size() for t in unique)


def load_weights(path: Path, name: str, device: str, expected: dict) -> dict[str, torch.Tensor]:
    """The weights in file `name`, with tied names restored as the same tensor, returned only if
    the file matches `expected` (its manifest entry)."""
    try:
        weights, metadata = load_safetensors(path / name, device, expected)
    except DigestMismatch:
        raise ArtifactError(mismatch_message(path, [name])) from None
    except ValueError as e:
        raise ArtifactError(f"{e}; rebuild the artifact") from None
    return restore_ties(weights, metadata)


def _load_cpu_kernels(package: Path) -> None:
    """A CPU program may call the C++ kernels through the dispatcher (kernels/cpu_kernels.py): load
    them (building them once per machine) before it runs, or refuse a program that needs them
    here, rather than fail at its first step."""
    try:
        cpu_kernels.load()
    except cpu_kernels.CpuKernelsUnavailable as e:
        if cpu_kernels.called_by(package):
            raise ArtifactError(f"{package}: the program calls the C++ CPU kernels, which cannot be loaded "
                                f"here ({e}); rebuild the artifact with LLAMA_AOT_CPU_KERNELS=0") from None


def _open_program(path: Path, manifest: Manifest, spec: ProgramSpec, device: str, rank: int,
                  single_threaded: bool, seconds: dict[str, float]):
    if tuple(spec.inputs) != PROGRAM_INPUTS.get(spec.name, tuple(spec.inputs)):
        raise ArtifactError(f"{path}: program {spec.name!r} takes {list(spec.inputs)}, this runtime passes "
                            f"{list(PROGRAM_INPUTS[spec.name])}; rebuild the artifact with this llama-compile")
    if device == "cpu":
        _load_cpu_kernels(path / spec.package)
    start = time.perf_counter()
    program = load_package(path / spec.package, single_threaded)
    seconds["program"] = seconds.get("program", 0.0) + time.perf_counter() - start
    start = time.perf_counter()
    weights_name = spec.weights[rank]
    weights = load_weights(path, weights_name, device, manifest.files[weights_name])
    attach_weights(program, weights, path / weights_name)
    seconds["weights"] = seconds.get("weights", 0.0) + time.perf_counter() - start
    return program, weights


def load_artifact(path: str | Path, device: str | None = None, rank: int = 0,
                  single_threaded: bool = False) -> Artifact:
    """Checks and loads rank `rank` of an artifact onto `device` (default: the device type it was
    built for). `single_threaded` loads the programs for capture in a CUDA graph."""
    path = Path(path)
    manifest, device = checked_manifest(path, device)
    if not 0 <= rank < manifest.world_size:
        raise ArtifactError(f"{path}: rank {rank} of an artifact built for {manifest.world_size} ranks")
    every_rank = frozenset(name for spec in manifest.programs for name in spec.weights)
    start = time.perf_counter()
    check_files(path, manifest.files, streamed=every_rank)  # each rank verifies its own weights as it loads them
    seconds = {"files": time.perf_counter() - start}
    programs, weights = {}, {}
    for spec in manifest.programs:
        programs[spec.name], weights[spec.name] = _open_program(path, manifest, spec, device, rank,
                                                                single_threaded, seconds)
    return Artifact(path=path, manifest=manifest, rank=rank, programs=programs, weights=weights,
                    load_seconds=seconds)
