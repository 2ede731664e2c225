"""RMSNorm with the residual add folded in: `h = x + residual; return rms_norm(h) * weight, h`.

The `fuse_add_rmsnorm` pass rewrites the model's separate add and norm into this op, so the sum is
read once instead of written and read back. The reference computes in float32 like HF's
LlamaRMSNorm, then casts back before the weight multiply, in the same order, so logits match HF's;
the CUDA kernel rounds at the same points.
"""
import importlib.util

import torch
from torch.library import triton_op

if importlib.util.find_spec("triton") is not None:
    from llama_aot.kernels.triton_rms_norm import add_rms_norm_triton
else:  # CPU-only installs: the reference is the CPU path
    add_rms_norm_triton = None


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


@triton_op("llama_aot::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    impl = add_rms_norm_triton if x.is_cuda else add_rms_norm_reference
    return impl(x, residual, weight, eps)
