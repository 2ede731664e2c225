"""Rotating this step's queries and keys (RoPE) and writing keys and values into the paged KV cache,
as one op.

The cache is one tensor, `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`, passed
to the program as an input and updated in place, so the runtime owns its memory and its size. A
token's slot is `block * block_size + offset`; the runtime points padding tokens at a reserved
block that no sequence reads.

Why one op: the rotation is a pointwise pass over q and k, and the cache write reads k and v
again; fused, the CUDA kernel reads q, k and v once (straight from the fused qkv projection's
output, whose column slices they are) and writes the rotated q and the cache.

With an FP8 cache (`llama-compile --kv-cache-dtype fp8_e4m3`) each layer has a K scale and a V
scale (float32 scalars, from the checkpoint or calibrated at build time): the write stores
`x / scale` rounded to e4m3, clamped to its range, and attention multiplies the scale back in.

Why `cos` and `sin` are inputs rather than positions and the inverse frequencies: the model builds
the `[num_tokens, head_dim]` tables once per step and every layer shares them, which costs each
layer a few hundred bytes per token against the kilobytes of q, k and v it moves anyway; and the
tables are float32 cos/sin rounded to the model dtype, exactly as in HF, where a rotation kernel's
own cos/sin would round differently and, after rounding to bf16, now and then change the result.

The tables are an op of their own (`rotary_tables`), not the plain torch expression: Inductor
treats that expression as cheap pointwise work and recomputes it in each kernel it fuses it into
(12 table kernels a bf16 step on the H100, more in the FP8 program, whose `torch.cond` per matmul
splits the graph into more regions). An op's output is a buffer, computed once: one kernel a step.
"""
import importlib.util

import torch
from torch.library import triton_op

from llama_aot.kernels.fp8_linear import FP8_MAX

if importlib.util.find_spec("triton") is not None:
    from llama_aot.kernels.triton_rope_kv import rope_write_kv_triton, rotary_tables_triton
else:  # CPU-only installs: the reference is the CPU path
    rope_write_kv_triton = rotary_tables_triton = None


def rotary_tables_reference(positions: torch.Tensor, inv_freq: torch.Tensor,
                            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's rotary embedding: float32 angles, each frequency twice (halves concatenated), cos and
    sin rounded to the model dtype."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@triton_op("llama_aot::rotary_tables", mutates_args=())
def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's `[T, head_dim]` cos and sin tables for this step's positions (int64 [T]) from the
    float32 inverse frequencies ([head_dim / 2]), in `dtype`; every layer's `rope_write_kv` reads them."""
    impl = rotary_tables_triton if positions.is_cuda else rotary_tables_reference
    return impl(positions, inv_freq, dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, head_dim]. HF's half-split (not interleaved) layout,
    computed in x's dtype in HF's order, so the result matches HF's bit for bit."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def to_cache(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values as the cache stores them: cast, or for an FP8 cache divided by the layer's
    scale and clamped to e4m3's range first (a value past it would not saturate on every device)."""
    if scale is None:
        return x.to(dtype)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def write_kv_reference(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                       slots: torch.Tensor, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> None:
    """One `index_put_` on the cache tensor itself, keys and values together.

    Indexing the base tensor (not a reshaped view of it) matters: functionalization turns a write
    through a view into "copy the whole cache, scatter, copy back", which Inductor cannot undo, and
    every step would then copy the entire KV cache once per layer."""
    block_size = kv_cache.shape[3]
    blocks, offsets = slots // block_size, slots % block_size
    half = torch.cat([torch.zeros_like(slots), torch.ones_like(slots)])
    index = (torch.full_like(half, layer), half, torch.cat([blocks, blocks]), torch.cat([offsets, offsets]))
    kv_cache.index_put_(index, torch.cat([to_cache(k, k_scale, kv_cache.dtype), to_cache(v, v_scale, kv_cache.dtype)]))


def rope_write_kv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                            slots: torch.Tensor, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    write_kv_reference(kv_cache, layer, apply_rope(k, cos, sin), v, slots, k_scale, v_scale)
    return apply_rope(q, cos, sin)


@triton_op("llama_aot::rope_write_kv", mutates_args={"kv_cache"})
def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kv_cache: torch.Tensor, layer: int, slots: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, heads, head_dim], k, v: [T, kv_heads, head_dim], all in the model dtype with any
    strides; writes RoPE(k) and v at `slots` of `layer` and returns RoPE(q) as a new tensor.
    `k_scale`, `v_scale`: the layer's scalars for an FP8 cache, None otherwise."""
    impl = rope_write_kv_triton if q.is_cuda else rope_write_kv_reference
    return impl(q, k, v, cos, sin, kv_cache, layer, slots, k_scale, v_scale)
