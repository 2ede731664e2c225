"""The hardware and toolchain an artifact is built for, and the check that this machine can run it.

A compiled program runs only where it was compiled for: the GPU arch for CUDA, the CPU's vector ISA
for CPU (a package built for AVX-512 dies with SIGILL on a machine without it), and the torch minor
version it was compiled with. The manifest's `target` records the first two; `producer.torch` the
third. Each refusal says what to rebuild.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from llama_aot.artifacts.errors import ArtifactError


def describe_host(device_type: str) -> dict[str, Any]:
    """The target fields of the machine we run on, in the manifest's terms."""
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return {"device_type": "cuda", "arch": f"sm_{major}{minor}", "device_name": torch.cuda.get_device_name()}
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = str(pick_vec_isa()) or "scalar"
    return {"device_type": "cpu", "arch": f"{platform.machine()}-{isa}", "device_name": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_supports(arch: str) -> bool:
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    machine, _, isa = arch.partition("-")
    return machine == platform.machine() and (isa == "scalar" or isa in {str(i) for i in valid_vec_isa_list()})


def check_target(path: Path, target: dict[str, Any], built_with_torch: str, device_type: str) -> None:
    """Raises ArtifactError unless this machine can run an artifact built for `target` with torch
    `built_with_torch` on `device_type`."""
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"{path} was built for {target['device_type']} but this machine has no CUDA GPU; "
                            "rebuild with llama-compile --target cpu")
    if target["device_type"] != device_type:
        raise ArtifactError(f"{path} was built for {target['device_type']}, not {device_type}; "
                            f"rebuild with llama-compile --target {device_type}")
    if device_type == "cpu" and not _cpu_supports(target["arch"]):
        raise ArtifactError(f"{path} was built for CPU arch {target['arch']}, which this machine "
                            f"({describe_host('cpu')['arch']}) cannot run; rebuild it on this machine")
    if device_type == "cuda" and target["arch"] != describe_host("cuda")["arch"]:
        raise ArtifactError(f"{path} was built for {target['arch']}, this GPU is "
                            f"{describe_host('cuda')['arch']}; rebuild it on this machine")
    here = torch.__version__
    if built_with_torch.split(".")[:2] != here.split(".")[:2]:
        raise ArtifactError(f"{path} was compiled with torch {built_with_torch}, this runtime has torch {here}; "
                            "rebuild the artifact with this torch")
