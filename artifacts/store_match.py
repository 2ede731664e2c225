"""Which of a store's artifacts this machine can run, why each other one cannot, and which to pick.

The rules are the loader's (artifacts/target.py), applied before anything is downloaded: the
device type; the GPU arch, or for CPU builds the vector ISA; torch's minor version; for GPU builds,
Triton's minor version (their kernels were compiled by it); and the world size, one rank per GPU.
A CPU build runs one rank unless `--tp N` asks for N CPU ranks. On a machine with a GPU a CPU build
does not count as fitting: pulling it by name (REF:NAME) still works. The device name (H100 vs
H200) is not a requirement, as the same arch runs the same code, but a build made on this very
GPU model is preferred, since its kernels were tuned there.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from llama_aot.artifacts.store_index import IndexEntry


@dataclass(frozen=True)
class Host:
    device_type: str
    arch: str
    device_name: str
    gpus: int
    torch: str
    triton: str | None

    def describe(self) -> str:
        gpus = f" x{self.gpus}" if self.gpus > 1 else ""
        triton = f", triton {self.triton}" if self.device_type == "cuda" else ""
        return f"{self.device_type} {self.arch} ({self.device_name}{gpus}), torch {self.torch}{triton}"


@functools.cache
def this_machine() -> Host:
    """This machine, in the manifest's terms. On a CPU it costs a few seconds once per process
    (torch probes the vector ISA by compiling), so it is only asked for when needed."""
    import torch

    from llama_aot.artifacts.target import describe_host

    device = "cuda" if torch.cuda.is_available() else "cpu"
    host = describe_host(device)
    return Host(device, host["arch"], host["device_name"], torch.cuda.device_count() if device == "cuda" else 1,
                torch.__version__, _triton_version())


def _triton_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


def _minor(version: str | None) -> list[str] | None:
    return version.split("+")[0].split(".")[:2] if version else None


def misfits(target: dict[str, Any], host: Host, tp: int | None = None) -> list[str]:
    """Why this machine cannot run an artifact built for `target` ([] if it can)."""
    reasons = []
    device, ranks = target["device_type"], target["world_size"]
    if device == "cuda" and host.device_type != "cuda":
        reasons.append(f"built for a CUDA GPU ({target['arch']}), this machine has none")
    elif device == "cpu" and host.device_type == "cuda":
        reasons.append("a CPU build, and this machine has a GPU (pull it as REF:NAME to run it on the CPU)")
    elif device == "cuda" and target["arch"] != host.arch:
        reasons.append(f"built for {target['arch']}, this GPU is {host.arch}")
    elif device == "cpu" and not _cpu_runs(target["arch"]):
        reasons.append(f"built for CPU arch {target['arch']}, this CPU is {host.arch}")
    if tp is not None and ranks != tp:
        reasons.append(f"built for --tp {ranks}, not --tp {tp}")
    elif tp is None and device == "cuda" and host.device_type == "cuda" and ranks > host.gpus:
        reasons.append(f"built for {ranks} GPUs (--tp {ranks}), {host.gpus} visible")
    elif tp is None and device == "cpu" and ranks != 1:
        reasons.append(f"built for --tp {ranks} (pull with --tp {ranks} to run {ranks} CPU ranks)")
    if _minor(target["torch"]) != _minor(host.torch):
        reasons.append(f"built with torch {target['torch']}, this machine has {host.torch}")
    if device == "cuda" and host.device_type == "cuda" and _minor(target["triton"]) != _minor(host.triton):
        reasons.append(f"built with triton {target['triton']}, this machine has {host.triton or 'none'}")
    return reasons


def _cpu_runs(arch: str) -> bool:
    from llama_aot.artifacts.target import _cpu_supports  # the loader's own rule

    return _cpu_supports(arch)


def best(entries: list[IndexEntry], host: Host) -> IndexEntry:
    """The one to pull among several that fit: built on this GPU model, then the most ranks this
    machine has GPUs for, then by name (so the choice is stable)."""
    return min(entries, key=lambda e: (e.target["device_name"] != host.device_name, -e.target["world_size"], e.name))


def compile_hint(host: Host, tp: int | None) -> str:
    ranks = tp if tp is not None else (host.gpus if host.device_type == "cuda" else 1)
    tp_flag = f" --tp {ranks}" if ranks > 1 else ""
    return f"llama-compile --model HF_CHECKPOINT_DIR --target {host.device_type}{tp_flag} -o artifacts/NAME"
