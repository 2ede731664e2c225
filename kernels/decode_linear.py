"""`x @ W.T` for a decode step's few rows.

The op exists for the CUDA target, where its kernel (kernels/triton_decode_linear.py) reads the
weight once without cuBLAS's split-K reduce. passes/route_decode_linears.py sends a matmul here
only when the step has at most MAX_ROWS rows, so every caller can rely on that bound. On CPU the
body is the reference.
"""
import importlib.util

import torch
from torch.library import triton_op

# The op's contract, and its kernel's tile height (one tensor-core tile of rows). Defined before
# the kernel module is imported, because that module reads it from here.
MAX_ROWS = 16
# An FP8 weight (fp8_linear's weight-only mode) is read by the same kernel in steps of up to
# FP8_MAX_ROWS rows: those past MAX_ROWS take a tile this tall. At batch 17-32 a step is still bound
# by reading the weights, and cuBLASLt's FP8 GEMMs at M = 32 read them at well under half the
# bandwidth (H100, gate_up 77.7 us for 117 MB; fp8-kv-build-choices-20261206-0815).
FP8_MAX_ROWS = 32

if importlib.util.find_spec("triton") is not None:
    from llama_aot.kernels.triton_decode_linear import decode_linear_triton
else:  # CPU-only installs: the reference is the CPU path
    decode_linear_triton = None


def decode_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x @ weight.T


@triton_op("llama_aot::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [M, K] with M <= MAX_ROWS; weight: [N, K]. Returns [M, N] in the weight's dtype."""
    impl = decode_linear_triton if x.is_cuda else decode_linear_reference
    return impl(x, weight)
