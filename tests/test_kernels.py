"""The kernels' torch references against naive attention and HF's RoPE and RMSNorm.

Sequences have odd lengths that straddle block boundaries, scattered block tables, and a batch
that mixes a fresh prefill, a chunk continuing a cached prefix, and single decode tokens.
"""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs
from llama_aot.kernels.kv_cache import rope_write_kv_reference, write_kv_reference
from llama_aot.kernels.paged_attention import paged_attention_reference
from llama_aot.kernels.rms_norm import add_rms_norm_reference

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 8, 4


def naive_attention(q, k, v, start):
    """q: [n, H, D] at positions start.., k/v: [start+n, Hkv, D]; plain causal softmax attention."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * HEAD_DIM ** -0.5
    q_pos = torch.arange(start, start + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("case", [
    [(0, 7), (5, 1), (13, 6), (3, 1)],   # prefill, decode, cached prefix + chunk, decode
    [(0, 1)],                            # a single first token
    [(15, 1), (16, 1), (4, 9)],          # decodes exactly at block boundaries
])
def test_paged_attention_matches_naive(case):
    gen = torch.Generator().manual_seed(len(case))
    num_blocks = 64
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1
    cache = torch.zeros(1, 2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    chunks, full_k, full_v, used = [], [], [], 0
    for start, n in case:
        blocks = -(-(start + n) // BLOCK)
        table = tuple(perm[used:used + blocks].tolist())
        used += blocks
        k = torch.randn(start + n, KV_HEADS, HEAD_DIM, generator=gen)
        v = torch.randn(start + n, KV_HEADS, HEAD_DIM, generator=gen)
        if start:  # the cached prefix is already in the cache
            prefix = build_step_inputs([SequenceChunk(tuple(range(start)), 0, table)], BLOCK)
            write_kv_reference(cache, 0, k[:start], v[:start], prefix["slots"])
        chunks.append(SequenceChunk(tuple(range(n)), start, table))
        full_k.append(k)
        full_v.append(v)
    step = build_step_inputs(chunks, BLOCK)
    new_k = torch.cat([k[s:] for k, (s, _) in zip(full_k, case)])
    new_v = torch.cat([v[s:] for v, (s, _) in zip(full_v, case)])
    write_kv_reference(cache, 0, new_k, new_v, step["slots"])
    q = torch.randn(step["tokens"].shape[0], HEADS, HEAD_DIM, generator=gen)
    out = paged_attention_reference(q, cache, 0, step["block_tables"], step["context_lens"],
                                    step["query_index"], step["positions"], HEAD_DIM ** -0.5)
    expected = torch.cat([naive_attention(qs, k, v, s) for qs, k, v, (s, _) in
                          zip(q.split([n for _, n in case]), full_k, full_v, case)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_write_kv_touches_only_its_slots():
    cache = torch.zeros(3, 2, 5, BLOCK, KV_HEADS, HEAD_DIM)
    slots = torch.tensor([0 * BLOCK + 3, 4 * BLOCK + 0, 2 * BLOCK + 1])
    k, v = torch.randn(3, KV_HEADS, HEAD_DIM), torch.randn(3, KV_HEADS, HEAD_DIM)
    write_kv_reference(cache, 1, k, v, slots)
    flat_k, flat_v = cache[1, 0].reshape(-1, KV_HEADS, HEAD_DIM), cache[1, 1].reshape(-1, KV_HEADS, HEAD_DIM)
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
    assert cache[0].abs().sum() == 0 and cache[2].abs().sum() == 0
    assert (cache[1].reshape(2, -1, KV_HEADS, HEAD_DIM).abs().sum((-1, -2)) != 0).sum() == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kv_matches_hf_rope(dtype):
    """q and k are rotated bit for bit as HF rotates them; the cache gets the rotated k and plain v."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(5, HEADS, HEAD_DIM, generator=gen).to(dtype)
    k, v = (torch.randn(5, KV_HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    half = torch.randn(5, HEAD_DIM // 2, generator=gen) * 100
    angles = torch.cat((half, half), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    cache = torch.zeros(1, 2, 4, BLOCK, KV_HEADS, HEAD_DIM, dtype=dtype)
    slots = torch.tensor([1, 2, 3, 4, 9])
    q_rot = rope_write_kv_reference(q, k, v, cos, sin, cache, 0, slots)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    flat = cache[0].reshape(2, -1, KV_HEADS, HEAD_DIM)
    assert torch.equal(q_rot, hf_q) and torch.equal(flat[0, slots], hf_k) and torch.equal(flat[1, slots], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_hf(dtype):
    x, r = torch.randn(5, 32, dtype=dtype), torch.randn(5, 32, dtype=dtype)
    hf = LlamaRMSNorm(32, eps=1e-5).to(dtype)
    torch.nn.init.normal_(hf.weight)
    normed, summed = add_rms_norm_reference(x, r, hf.weight.detach(), 1e-5)
    assert torch.equal(summed, x + r)
    torch.testing.assert_close(normed, hf(x + r).detach(), atol=0, rtol=0)
