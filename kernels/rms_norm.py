"""RMSNorm with the residual add folded in: `h = x + residual; return rms_norm(h) * weight, h`.

The `fuse_add_rmsnorm` pass rewrites the model's separate add and norm into this op, so the sum is
read once instead of written and read back. The reference computes in float32 like HF's
LlamaRMSNorm, then casts back before the weight multiply, in the same order, so logits match HF's.
"""
import torch
from torch.library import triton_op


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


@triton_op("llama_aot::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return add_rms_norm_reference(x, residual, weight, eps)
