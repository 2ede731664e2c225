"""Causal GQA attention for a flat batch that mixes prefill chunks and decode tokens, reading keys
and values from the paged cache (after this step's `rope_write_kv`).

The batch is described by explicit tensors, never by Python state:
- `query_index [B, Q]`: for sequence b, the flat token index of its q-th new token, padded with
  T (one past the last token) where the sequence has fewer than Q new tokens;
- `positions [T]`: each token's position in its sequence, which bounds what it may attend to;
- `block_tables [B, NB]` and `context_lens [B]`: where each sequence's cache lives and how long
  it is after this step.
A decode-only batch has Q == 1, so the reference pays for padding only when prefills share a step.
In such a step token b is sequence b's, at position `context_lens[b] - 1` (build_step_inputs and the
decode graphs' pad rows both lay it out so); the CUDA kernel reads neither `query_index` nor
`positions` then, which takes two dependent loads off the start of every decode program.
"""
import importlib.util

import torch
from torch.library import triton_op

from llama_aot.kernels import cpu_kernels

if importlib.util.find_spec("triton") is not None:
    from llama_aot.kernels.triton_paged_attention import paged_attention_triton
else:  # CPU-only installs: the reference is the CPU path
    paged_attention_triton = None


def paged_attention_reference(q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                              block_tables: torch.Tensor, context_lens: torch.Tensor,
                              query_index: torch.Tensor, positions: torch.Tensor,
                              scale: float, k_scale: torch.Tensor | None = None,
                              v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Gathers each sequence's context once per KV head and attends its queries to it; the query
    heads that share a KV head are stacked into the matmul instead of repeating K and V.

    An FP8 cache is read as the CUDA kernel reads it: e4m3 widens to the query dtype exactly, the
    K scale multiplies the float32 scores and the V scale the output, so no dequantized copy of
    the context is made."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[4], kv_cache.shape[3]
    batch, q_len = query_index.shape
    group = num_heads // num_kv_heads
    ctx = block_tables.shape[1] * block_size

    tables = block_tables.long()
    k = kv_cache[layer, 0][tables].reshape(batch, ctx, num_kv_heads, head_dim).permute(0, 2, 3, 1)
    v = kv_cache[layer, 1][tables].reshape(batch, ctx, num_kv_heads, head_dim).transpose(1, 2)
    if kv_cache.dtype.itemsize == 1:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if k_scale is not None:
        scale = scale * k_scale

    q_pad = torch.cat([q, q.new_zeros(1, num_heads, head_dim)])[query_index]
    q_pad = q_pad.view(batch, q_len, num_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
    scores = torch.matmul(q_pad.reshape(batch, num_kv_heads, q_len * group, head_dim).to(k.dtype), k)
    scores = scores.float().view(batch, num_kv_heads, q_len, group, ctx) * scale

    q_pos = torch.cat([positions, positions.new_zeros(1)])[query_index]
    key_pos = torch.arange(ctx, device=q.device)
    visible = (key_pos <= q_pos[:, :, None]) & (key_pos < context_lens[:, None, None])
    scores = scores.masked_fill(~visible[:, None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(batch, num_kv_heads, q_len * group, ctx)

    out = torch.matmul(probs, v)
    if v_scale is not None:
        out = (out.float() * v_scale).to(v.dtype)
    out = out.view(batch, num_kv_heads, q_len, group, head_dim)
    out = out.permute(0, 2, 1, 3, 4).reshape(batch * q_len, num_heads, head_dim).to(q.dtype)
    flat = q.new_zeros(num_tokens + 1, num_heads, head_dim).index_copy(0, query_index.reshape(-1), out)
    return flat[:num_tokens]


@triton_op("llama_aot::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_index: torch.Tensor, positions: torch.Tensor,
                    scale: float, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`k_scale`, `v_scale`: the layer's scalars for an FP8 cache (kernels/kv_cache.py), None otherwise."""
    if q.is_cuda:
        impl = paged_attention_triton
    elif cpu_kernels.available():  # the C++ kernel (kernels/cpu_kernels.py says why), opaque to Inductor
        impl = torch.ops.llama_aot.paged_attention_cpu
    else:
        impl = paged_attention_reference
    return impl(q, kv_cache, layer, block_tables, context_lens, query_index, positions, scale, k_scale, v_scale)
