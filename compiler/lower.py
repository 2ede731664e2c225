"""AOTInductor lowering: the passed program becomes a `.pt2` package of compiled code, no weights.

Weights stay out of the package (`package_constants_in_so=False`): an 8B model's constants inside
the shared library make a multi-GB package that crashes at load, and keeping them separate lets
the weights be hashed, mmapped and sharded per rank. Inductor options are passed per call, never
set globally, so building never changes how other torch.compile users in the process behave.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.export import ExportedProgram

from llama_aot.compiler.inductor_fixes import lowering_fixes

INDUCTOR_OPTIONS = {"aot_inductor.package_constants_in_so": False}
# Benchmarks cuBLAS against Inductor's Triton GEMM templates for each matmul shape at build time.
AUTOTUNE_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"}


def lower(ep: ExportedProgram, package_path: Path, max_autotune: bool = False) -> Path:
    options = {**INDUCTOR_OPTIONS, **(AUTOTUNE_OPTIONS if max_autotune else {})}
    with lowering_fixes():
        out = torch._inductor.aoti_compile_and_package(ep, package_path=str(package_path), inductor_configs=options)
    return Path(out)


def program_constants(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """Every tensor the compiled program may ask for by name: parameters, buffers and lifted
    constants. The loader hands exactly the ones the package lists back to it."""
    constants = {k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}
    constants.update(ep.state_dict)
    return {k: v.detach() for k, v in constants.items()}
