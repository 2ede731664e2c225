"""FP8 weight matmuls: `y = x @ (W_fp8 * scale)^T`, W in float8_e4m3fn with one float32 scale per
output channel (the "per channel" scheme of compressed-tensors' FP8 checkpoints).

Three ways to compute it, chosen per weight shape and step size by the quantize pass
(passes/quantize_fp8.py, by timing them on the building GPU):
- WEIGHT_ONLY: the weight widened to x's dtype. Activations stay in the model dtype, so the only
  error is the weights' rounding. At decode batch sizes a matmul is bound by reading W, and an FP8
  W is half the bytes of a BF16 one. On CUDA this is the decode_linear kernel reading e4m3
  (kernels/triton_decode_linear.py), which takes at most FP8_MAX_ROWS rows of x there; the pass
  routes larger steps to another mode. On CPU, W dequantized and multiplied.
- PER_TOKEN: each row of x quantized to e4m3 with its own scale (dynamic, at run time) and the FP8
  product taken by `torch._scaled_mm` with row-wise scales on both sides (what vLLM and SGLang run
  for "FP8-dynamic" checkpoints). FP8 tensor cores double the arithmetic rate, which counts once a
  step holds many tokens.
- PER_TOKEN_EPILOGUE: the same quantized operands through `_scaled_mm` with unit tensor-wise
  scales, both scale vectors then applied to its [M, N] output. cuBLASLt's tensor-wise FP8 kernels
  can be much faster than its row-wise ones at small M (H100, down_proj at M = 1: 25.9 against
  48.9 us), and scaling the output by x's row scale and W's column scale computes the same product.
- PER_TOKEN_TILES: PER_TOKEN's product from a Triton kernel of our own made for decode batches
  (kernels/triton_fp8_rows.py: both operands e4m3 into the tensor cores, K split for narrow
  weights), where cuBLASLt's FP8 kernels and the weight-only one read the weight at well under
  the bandwidth one row gets. On CPU it is PER_TOKEN.
"""
import importlib.util

import torch
import torch.nn.functional as F
from torch.library import triton_op

from llama_aot.kernels.decode_linear import decode_linear_triton  # None where Triton is not installed

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
WEIGHT_ONLY, PER_TOKEN, PER_TOKEN_EPILOGUE = "weight_only", "per_token", "per_token_epilogue"
PER_TOKEN_TILES = "per_token_tiles"
MODES = (WEIGHT_ONLY, PER_TOKEN, PER_TOKEN_EPILOGUE, PER_TOKEN_TILES)

if importlib.util.find_spec("triton") is not None:
    from llama_aot.kernels.triton_fp8_rows import fp8_rows_triton


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
    if mode in (PER_TOKEN, PER_TOKEN_TILES):
        return torch._scaled_mm(xq, weight.t(), scale_a=x_scale[:, None], scale_b=weight_scale[None, :],
                                out_dtype=x.dtype)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    product = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (product * x_scale[:, None] * weight_scale[None, :]).to(x.dtype)


def silu_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Llama MLP's activation, `act_fn(gate) * up` as HF computes it."""
    return F.silu(gate) * up


@triton_op("llama_aot::fp8_gated_linear", mutates_args=())
def fp8_gated_linear(gate_up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     mode: str) -> torch.Tensor:
    """`fp8_linear(silu(gate) * up, weight, weight_scale, mode)` with gate and up the two halves of
    `gate_up` [M, 2I] (gate first): down_proj with the MLP's activation folded into its input
    (passes/quantize_fp8.py). On CUDA the weight-only kernel computes the activation as it loads
    its input, so a decode step runs no kernel of its own for it; the other modes take it as a
    pointwise op that Inductor fuses into their activation quantization. One tensor, not two
    halves: `torch.cond` (quantize_fp8's routing by step size) takes no operands that alias."""
    gate, up = gate_up.chunk(2, dim=-1)
    return _fp8_matmul(gate, weight, weight_scale, mode, up)


@triton_op("llama_aot::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, mode: str) -> torch.Tensor:
    """x: [M, K] in the model dtype; weight: [N, K] float8_e4m3fn; weight_scale: [N] float32.
    Returns [M, N] in x's dtype. `mode` is one of MODES; WEIGHT_ONLY on CUDA takes M <= FP8_MAX_ROWS."""
    return _fp8_matmul(x, weight, weight_scale, mode)


def _fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, mode: str,
                up: torch.Tensor | None = None) -> torch.Tensor:
    """Both ops' body: the product of x (with `up`, of `silu(x) * up`) by the FP8 weight in `mode`."""
    if x.is_cuda and mode == WEIGHT_ONLY:
        return decode_linear_triton(x, weight, weight_scale, up)
    if up is not None:
        x = silu_times(x, up)
    if x.is_cuda and mode == PER_TOKEN_TILES:
        return fp8_rows_triton(*quantize_rows(x), weight, weight_scale, x.dtype)
    return fp8_linear_reference(x, weight, weight_scale, mode)
