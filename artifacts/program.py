"""Loading a compiled program package and handing it its weights.

A package (`.pt2`, AOTInductor) holds compiled code and no weights
(`aot_inductor.package_constants_in_so=False`). The weights are given to it as user-managed
constants: the program reads their memory without a reference of its own, so whoever loads it
must keep the weights alive as long as the program. The caller imports llama_aot.kernels.ops
first: the program calls torch.ops.llama_aot.
"""
from __future__ import annotations

from pathlib import Path

import torch

from llama_aot.artifacts.errors import ArtifactError


def load_package(package: Path, single_threaded: bool = False):
    """AOTInductor's package loader, called directly rather than through `aoti_load_package`.

    That wrapper first compares the host with the build's metadata, only to log a warning on a
    mismatch, and reads the host's CPU vector ISA to do so: torch 2.11 compiles a probe per ISA the
    CPU flags claim and runs each in a child `python -c "import torch; ..."`, and its AMX probes run
    even with `cpp.vec_isa_ok` set. On the GPU machine the wrapper took 44 s for a 2 MB package,
    and 24-30 s with `vec_isa_ok` set; the C++ loader itself only unzips the package and opens the
    library. The artifact's target check has already refused a program this host cannot run.
    `single_threaded` loads the program for capture in a CUDA graph."""
    from torch._inductor.package import AOTICompiledModel

    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", single_threaded, 1, -1)
    except Exception as e:  # the loader raises RuntimeError subclasses with C++ detail
        raise ArtifactError(f"{package}: cannot be loaded ({str(e).splitlines()[0]}); "
                            "rebuild the artifact on this machine") from None
    return AOTICompiledModel(loader)


def attach_weights(program, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Gives `program` the constants it names, from `weights` (read from `source`)."""
    needed = program.get_constant_fqns()
    missing = [n for n in needed if n not in weights]
    if missing:
        raise ArtifactError(f"{source} lacks weights {missing[:5]}; rebuild the artifact")
    program.load_constants({n: weights[n] for n in needed}, check_full_update=True, user_managed=True)
