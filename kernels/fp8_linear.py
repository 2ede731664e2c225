"""FP8 weight matmuls: `y = x @ (W_fp8 * scale)^T`, W in float8_e4m3fn with one float32 scale per
output channel (the "per channel" scheme of compressed-tensors' FP8 checkpoints).

Two ways to compute it, chosen per matmul by the quantize pass (passes/quantize_fp8.py):
- WEIGHT_ONLY: dequantize W to x's dtype and multiply. Activations stay in the model dtype, so the
  only error is the weights' rounding. At decode batch sizes a matmul is bound by reading W, and
  an FP8 W is half the bytes of a BF16 one whichever way the product is then computed.
- PER_TOKEN: quantize each row of x to e4m3 with its own scale (dynamic, at run time) and take
  the FP8 product with `torch._scaled_mm`, row-wise scales on both sides (what vLLM and SGLang run
  for "FP8-dynamic" checkpoints). FP8 tensor cores double the arithmetic rate, which counts once
  a step holds many tokens.
Both bodies are plain torch: on CPU Inductor compiles them to C++ (torch's CPU `_scaled_mm`
included); on CUDA the same graph takes cuBLASLt for `_scaled_mm`.
"""
import torch
from torch.library import triton_op

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
WEIGHT_ONLY, PER_TOKEN = "weight_only", "per_token"
MODES = (WEIGHT_ONLY, PER_TOKEN)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `t` scaled so its largest magnitude maps to FP8_MAX: (fp8 rows, float32 scales
    of shape [rows]). An all-zero row gets a tiny scale, not a division by zero."""
    scale = t.abs().amax(dim=-1).float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         mode: str) -> torch.Tensor:
    if mode == WEIGHT_ONLY:
        return x @ dequantize_rows(weight, weight_scale, x.dtype).T
    xq, x_scale = quantize_rows(x)
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale[:, None], scale_b=weight_scale[None, :],
                            out_dtype=x.dtype)


@triton_op("llama_aot::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, mode: str) -> torch.Tensor:
    """x: [M, K] in the model dtype; weight: [N, K] float8_e4m3fn; weight_scale: [N] float32.
    Returns [M, N] in x's dtype. `mode` is one of MODES."""
    return fp8_linear_reference(x, weight, weight_scale, mode)
