"""Weight matmuls as one op, `llama_aot::linear(x, W) = x @ W.T`, so the CUDA target can choose its
own kernel per token count (see triton_linear.py) while CPU builds keep Inductor's matmul.

The `lower_linears` pass rewrites the exported program's `aten.linear` nodes into this op after
the fusion passes, which match `aten.linear`, have run.
"""
import importlib.util

import torch
import torch.nn.functional as F
from torch.library import triton_op

if importlib.util.find_spec("triton") is not None:
    from llama_aot.kernels.triton_linear import linear_triton
else:  # CPU-only installs: the reference is the CPU path
    linear_triton = None


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


@triton_op("llama_aot::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    impl = linear_triton if x.is_cuda else linear_reference
    return impl(x, weight)
