"""RoPE in Triton for CUDA: the step's cos/sin tables, and the rotation fused with the paged
KV-cache write.

The tables kernel computes what the reference does (float32 angles `position * inv_freq`, cos and
sin rounded to the model dtype), one program per token.

One program per token covers all of its heads: it loads the token's cos/sin row once, rotates every
query and key head, stores the rotated queries, and writes the rotated keys and the values into the
token's cache slot. q, k and v are read through their strides, so the column slices of the fused
qkv projection go in without a copy. The rotation rounds where the reference does (each product,
then the sum, to the model dtype); on the H200 the compiled kernel still differs from the reference
by one bf16 rounding in a few elements, which the tests allow and nothing more.

An FP8 cache gets `x / scale` clamped to e4m3's range (the layer's K and V scales, loaded once
per program); a cache in the model dtype gets the values as they are, and the kernel is built
without the scale loads.

Cache offsets are computed in int64: a large model's cache holds more than 2**31 elements, and
`layer * layer_stride` alone can pass that.

Imported only where Triton is; `rope_write_kv` dispatches here for CUDA tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2, DTYPE: tl.constexpr):
    """HF's `x * cos + rotate_half(x) * sin` on the two halves, rounded like torch's separate ops."""
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    a1 = (x1 * c1).to(DTYPE).to(tl.float32)
    b1 = (-x2 * s1).to(DTYPE).to(tl.float32)
    a2 = (x2 * c2).to(DTYPE).to(tl.float32)
    b2 = (x1 * s2).to(DTYPE).to(tl.float32)
    return (a1 + b1).to(DTYPE), (a2 + b2).to(DTYPE)


@triton.jit
def _to_cache(x, scale, cache_dtype, QUANTIZE: tl.constexpr):
    if QUANTIZE:
        return tl.clamp(x.to(tl.float32) / scale, -448.0, 448.0).to(cache_dtype)
    return x.to(cache_dtype)


@triton.jit
def _rope_write_kv_kernel(
        Q, K, V, Cos, Sin, KV, Slots, QOut, KScale, VScale, layer,
        stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
        stride_ct, stride_cd, stride_st, stride_sd, stride_slot,
        stride_cl, stride_ckv, stride_cb, stride_cs, stride_ch, stride_cdim,
        NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
        KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        QUANTIZE: tl.constexpr):
    token = tl.program_id(0)
    dtype = QOut.dtype.element_ty
    dims = tl.arange(0, HALF_PAD)
    live_dims = dims < HALF
    cos = Cos + token * stride_ct + dims * stride_cd
    sin = Sin + token * stride_st + dims * stride_sd
    c1 = tl.load(cos, mask=live_dims, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos + HALF * stride_cd, mask=live_dims, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin, mask=live_dims, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin + HALF * stride_sd, mask=live_dims, other=0.0).to(tl.float32)[None, :]

    heads = tl.arange(0, HEADS_PAD)[:, None]
    mask = (heads < NUM_HEADS) & live_dims[None, :]
    q = Q + token * stride_qt + heads * stride_qh + dims[None, :] * stride_qd
    q1, q2 = _rotate(tl.load(q, mask=mask), tl.load(q + HALF * stride_qd, mask=mask), c1, c2, s1, s2, dtype)
    out = QOut + token * (NUM_HEADS * 2 * HALF) + heads * (2 * HALF) + dims[None, :]
    tl.store(out, q1, mask=mask)
    tl.store(out + HALF, q2, mask=mask)

    kv_heads = tl.arange(0, KV_HEADS_PAD)[:, None]
    kv_mask = (kv_heads < NUM_KV_HEADS) & live_dims[None, :]
    k = K + token * stride_kt + kv_heads * stride_kh + dims[None, :] * stride_kd
    k1, k2 = _rotate(tl.load(k, mask=kv_mask), tl.load(k + HALF * stride_kd, mask=kv_mask), c1, c2, s1, s2, dtype)
    v = V + token * stride_vt + kv_heads * stride_vh + dims[None, :] * stride_vd
    v1, v2 = tl.load(v, mask=kv_mask), tl.load(v + HALF * stride_vd, mask=kv_mask)

    slot = tl.load(Slots + token * stride_slot).to(tl.int64)
    cache_dtype = KV.dtype.element_ty
    k_scale, v_scale = 1.0, 1.0
    if QUANTIZE:
        k_scale, v_scale = tl.load(KScale), tl.load(VScale)
    dst = (KV + tl.cast(layer, tl.int64) * stride_cl + (slot // BLOCK_SIZE) * stride_cb
           + (slot % BLOCK_SIZE) * stride_cs + kv_heads * stride_ch + dims[None, :] * stride_cdim)
    tl.store(dst, _to_cache(k1, k_scale, cache_dtype, QUANTIZE), mask=kv_mask)
    tl.store(dst + HALF * stride_cdim, _to_cache(k2, k_scale, cache_dtype, QUANTIZE), mask=kv_mask)
    tl.store(dst + stride_ckv, _to_cache(v1, v_scale, cache_dtype, QUANTIZE), mask=kv_mask)
    tl.store(dst + stride_ckv + HALF * stride_cdim, _to_cache(v2, v_scale, cache_dtype, QUANTIZE), mask=kv_mask)


@triton.jit
def _rotary_tables_kernel(Positions, InvFreq, Cos, Sin, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0)
    dims = tl.arange(0, HALF_PAD)
    live = dims < HALF
    angles = tl.load(Positions + token).to(tl.float32) * tl.load(InvFreq + dims, mask=live, other=0.0)
    cos, sin = tl.cos(angles).to(Cos.dtype.element_ty), tl.sin(angles).to(Sin.dtype.element_ty)
    row = token * 2 * HALF + dims
    tl.store(Cos + row, cos, mask=live)
    tl.store(Cos + row + HALF, cos, mask=live)
    tl.store(Sin + row, sin, mask=live)
    tl.store(Sin + row + HALF, sin, mask=live)


def rotary_tables_triton(positions: torch.Tensor, inv_freq: torch.Tensor,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    half = inv_freq.shape[0]
    cos = torch.empty(positions.shape[0], 2 * half, dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    wrap_triton(_rotary_tables_kernel)[(positions.shape[0],)](
        positions.contiguous(), inv_freq.contiguous(), cos, sin, HALF=half, HALF_PAD=triton.next_power_of_2(half))
    return cos, sin


def rope_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                         slots: torch.Tensor, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    quantize = k_scale is not None
    if not quantize:  # the pointers are never read; any tensor stands in
        k_scale = v_scale = slots
    num_kv_heads = k.shape[1]
    heads_pad, half_pad = triton.next_power_of_2(num_heads), triton.next_power_of_2(head_dim // 2)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    wrap_triton(_rope_write_kv_kernel)[(num_tokens,)](
        q, k, v, cos, sin, kv_cache, slots, out, k_scale, v_scale, layer,
        *q.stride(), *k.stride(), *v.stride(), *cos.stride(), *sin.stride(), slots.stride(0),
        *kv_cache.stride(),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEADS_PAD=heads_pad,
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HALF=head_dim // 2, HALF_PAD=half_pad,
        BLOCK_SIZE=kv_cache.shape[3], QUANTIZE=quantize, num_warps=min(16, max(4, heads_pad * half_pad // 512)))
    return out
