"""AOTInductor lowering: the passed program becomes a `.pt2` package of compiled code, no weights.

Weights stay out of the package (`package_constants_in_so=False`): an 8B model's constants inside
the shared library make a multi-GB package that crashes at load, and keeping them separate lets
the weights be hashed, mmapped and sharded per rank. Inductor options are passed per call, never
set globally, so building never changes how other torch.compile users in the process behave.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.export import ExportedProgram

from llama_aot.compiler.inductor_fixes import lowering_fixes

# always_keep_tensor_constants: Inductor otherwise inlines constants of up to 8 elements, and each
# use of one becomes a kernel that writes its value into a fresh buffer on every call: the FP8 KV
# cache's 64 per-layer scales were ~170 such kernels a step, 0.15 ms of a 3.7 ms H100 step
# (docs/fp8.md). Kept, they are weights like any other.
INDUCTOR_OPTIONS = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}
# Benchmarks cuBLAS against Inductor's Triton GEMM templates for each matmul shape at build time.
AUTOTUNE_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"}


def lower(ep: ExportedProgram, package_path: Path, max_autotune: bool = False) -> Path:
    options = {**INDUCTOR_OPTIONS, **(AUTOTUNE_OPTIONS if max_autotune else {})}
    with lowering_fixes(), _addressable_weights(ep):
        out = torch._inductor.aoti_compile_and_package(ep, package_path=str(package_path), inductor_configs=options)
    return Path(out)


@contextlib.contextmanager
def _addressable_weights(ep: ExportedProgram):
    """AOTInductor reads a constant's address, never its value: it merges constants that share
    one. Fake weights (compiler/lazy_weights.py) have none, so while lowering each stands as an
    untouched `torch.empty` of its layout (on the CPU, address space with no pages behind it)."""
    tables = [ep.state_dict, ep.constants]
    saved = [dict(t) for t in tables]
    stand_ins: dict[int, torch.Tensor] = {}  # one per fake, so tied weights stay tied
    for table in tables:
        for name, t in table.items():
            if isinstance(t, FakeTensor):
                if id(t) not in stand_ins:
                    empty = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                    stand_ins[id(t)] = torch.nn.Parameter(empty, requires_grad=False) \
                        if isinstance(t, torch.nn.Parameter) else empty
                table[name] = stand_ins[id(t)]
    try:
        yield
    finally:
        for table, old in zip(tables, saved):
            table.clear()
            table.update(old)


def program_constants(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """Every tensor the compiled program may ask for by name: parameters, buffers and lifted
    constants. The loader hands exactly the ones the package lists back to it."""
    constants = {k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}
    constants.update(ep.state_dict)
    return {k: v.detach() for k, v in constants.items()}
