"""Paged attention in Triton for CUDA: one kernel for any mix of prefill chunks and decode tokens.

Each program owns one tile of queries of one sequence for one KV head, and one split of that
sequence's context (flash-decoding):
- the query heads that share the KV head are stacked into the tile's rows (GQA packing), so each
  KV page is read once per KV head, not once per query head;
- programs are numbered over the step's live tiles, not over sequences x the longest chunk: a
  step that mixes 100 decode tokens with one 512-token prefill chunk would otherwise launch 32
  tiles for every decode token, 31 of them empty (serving 1000-token prompts at c=100 on the
  H200, the inter-token latency's p95 was 145 ms against a median of 20 ms). Sequence b's tiles
  start at b + first_token(b) // BLOCK_Q, so tiles of different sequences never collide and
  batch + cdiv(tokens, BLOCK_Q) programs cover them all; a program finds its sequence by counting
  the tile starts at or below its number (a decode-only step maps program b to sequence b);
- the context is cut into ranges (splits) processed by separate programs, so a single long decode
  still fills the GPU; each split keeps an online softmax (running max, sum, accumulator) and a
  second kernel merges the splits by log-sum-exp weights, one program per (token, head), writing
  the output in the query dtype (a torch merge became two Inductor kernels: one launch more per
  layer, and launches are what a short-context decode step is made of). A row that sees no key in
  its split (the split lies past its context, or past its position in a prefill chunk) stores only
  its max (-inf) and sum, and the merge skips its accumulator;
- keys are gathered through the block table page by page, so the cache is never copied. The key
  loop is a `while`: a `for` that Triton could software-pipeline (2 stages) measured slower on
  the H200 (5.3 -> 6.4 us per layer at 128-token context, 8K-context decode 5.47 -> 5.66 ms per
  token, batch 32 at 1K 7.71 -> 8.24 ms), and the interpreter needs the `while` anyway.
An FP8 cache (e4m3) is read as it is: each page widens to float16 in registers (float32 for a
float32 model; exact either way; sm_89+ converts e4m3 pairs to float16 in one instruction, where
widening to bf16 goes through float32, and a bf16 query or probability is exact in float16 or
rounds more finely), the layer's K scale
joins the softmax scale on the float32 scores and its V scale multiplies the split's accumulator,
so the kernel reads half the bytes and dequantizes nothing in memory. Widened to bf16, the FP8
kernel read the cache at 35-50 % of copy bandwidth on the H100, barely faster than the bf16 cache
(batch 32 at 1K context 56 against 62 us per layer); in float16 with FP8_DECODE_TILE, 50 us.
Masked rows (padding queries, padded group heads) are computed but never stored.

Imported only where Triton is; `paged_attention` dispatches here for CUDA tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# Splits per context: a decode step of `batch` sequences gets max(8, 32 // batch), a step with a
# prefill chunk 8. On the H200 (bench/attention.py, us per layer, 16 splits against the pick):
# batch 1 at 8K context 23.1 -> 15.5 with 32 (at 128 context 5.8 -> 6.4, the only loss), batch 64
# at 128 context 36.0 -> 25.1 with 8, and 8 beat 16 on every step with a 512-token chunk (6-27%).
# Fewer splits mean fewer partial results to write and merge; more keep a small batch's programs
# filling the GPU. The batch is a symbolic size in the exported program, so the count is too.
MIN_SPLITS, MAX_SPLITS = 8, 32
# Tiles as (query rows, keys per step of the key loop); rows are query tokens x (padded) group heads.
# A decode tile holds one token's 4 heads whatever its size, so its other rows are padding that
# costs registers: 16 rows beat 64 by 1.3-1.7x at batch 16-64 (bench/attention.py on the H200,
# e.g. batch 64 at 8K context 681 against 905 us per layer). A prefill chunk fills its rows, and
# 64 rows read each key for 16 tokens: 16-row tiles were 1.2-2x slower on steps with a 512-token
# chunk.
DECODE_TILE = (16, 64)
# An FP8 cache's decode tile: 128 keys a loop step, as many bytes as the bf16 tile's 64. On the H100
# (bench/attention.py --kv-cache-dtype fp8_e4m3, attention-20261206-114421, us per layer): batch 32
# at 1K context 62.5 -> 50.1, at 8K 387 -> 292, batch 1 at 8K 13.6 -> 12.1; batch 1 at 1K 6.1 -> 7.4.
FP8_DECODE_TILE = (16, 128)
CHUNK_TILE = (64, 64)
SEQ_SCAN = 128  # sequences whose tile starts a program compares at once while finding its own


@triton.jit
def _widened(page, q, FP8_CACHE: tl.constexpr, WIDEN_TO_HALF: tl.constexpr):
    """A page of keys or values as the dot takes it: an FP8 page widened (see the module docstring)."""
    if FP8_CACHE:
        if WIDEN_TO_HALF:
            page = page.to(tl.float16)
        else:
            page = page.to(q.dtype)
    return page


@triton.jit
def _attend_block(q, pos, m_i, l_i, acc, n0, end, table, k_base, v_base, stride_kb, stride_ks, dims, scale,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, FP8_CACHE: tl.constexpr,
                  WIDEN_TO_HALF: tl.constexpr):
    """One online-softmax update over keys [n0, n0 + BLOCK_N) ∩ [.., end), gathered page by page."""
    keys = n0 + tl.arange(0, BLOCK_N)
    in_range = keys < end
    page = tl.load(table + keys // BLOCK_SIZE, mask=in_range, other=0)
    offset = page.to(tl.int64) * stride_kb + (keys % BLOCK_SIZE) * stride_ks
    k = _widened(tl.load(k_base + offset[None, :] + dims[:, None], mask=in_range[None, :], other=0.0),
                 q, FP8_CACHE, WIDEN_TO_HALF)
    scores = tl.dot(q.to(k.dtype), k, input_precision="ieee") * scale
    scores = tl.where((keys[None, :] <= pos[:, None]) & in_range[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _widened(tl.load(v_base + offset[:, None] + dims[None, :], mask=in_range[:, None], other=0.0),
                 q, FP8_CACHE, WIDEN_TO_HALF)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _query_tile(tile, QueryIndex, batch, q_len, BLOCK_Q: tl.constexpr, SEQ_SCAN: tl.constexpr):
    """(sequence, tile within it) of program `tile`; see the module docstring for the numbering. A
    decode-only step skips the scan and its loads, which would add a memory round trip to every
    program of the step type that is most sensitive to latency."""
    seq, q_tile = tile, tile * 0
    if q_len > 1:
        count = tile * 0
        s0 = tile * 0
        while s0 < batch:
            seqs = s0 + tl.arange(0, SEQ_SCAN)
            first = tl.load(QueryIndex + seqs * q_len, mask=seqs < batch, other=0)
            count += tl.sum(((seqs + first // BLOCK_Q <= tile) & (seqs < batch)).to(tl.int32), 0)
            s0 += SEQ_SCAN
        seq = count - 1
        q_tile = tile - seq - (tl.load(QueryIndex + seq * q_len) // BLOCK_Q).to(tl.int32)
    return seq, q_tile


@triton.jit
def _paged_attention_kernel(
        Q, KV, BlockTables, ContextLens, QueryIndex, Positions, Acc, Max, Sum, KScale, VScale,
        layer, num_tokens, batch, q_len,
        stride_qt, stride_qh, stride_kl, stride_kkv, stride_kb, stride_ks, stride_kh,
        stride_bt, stride_as, stride_at, stride_ah, stride_ms, stride_mt, splits,
        BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SCALE: tl.constexpr, SEQ_SCAN: tl.constexpr,
        FP8_CACHE: tl.constexpr, WIDEN_TO_HALF: tl.constexpr):
    kv_head, split = tl.program_id(1), tl.program_id(2)
    seq, q_tile = _query_tile(tl.program_id(0), QueryIndex, batch, q_len, BLOCK_Q, SEQ_SCAN)
    if seq >= batch:  # the grid's bound is loose; a tile past a sequence's tokens has no live row
        return

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_slot = q_tile * BLOCK_Q + rows // GROUP_PAD
    group = rows % GROUP_PAD
    live = (q_slot < q_len) & (group < GROUP)
    context = tl.load(ContextLens + seq)
    if q_len == 1:  # a decode step: token b is sequence b's, at its last position (see paged_attention.py)
        token = (seq + q_slot).to(tl.int64)  # the types the loads below give
        pos = tl.where(live, context - 1, -1).to(tl.int64)
    else:
        token = tl.load(QueryIndex + seq * q_len + q_slot, mask=live, other=num_tokens)
        live = live & (token < num_tokens)
        pos = tl.load(Positions + token, mask=live, other=-1)
    head = kv_head * GROUP + group
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=live[:, None], other=0.0)

    visible_end = tl.minimum(context, tl.max(pos, 0) + 1)
    chunk = tl.cdiv(tl.cdiv(context, splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, visible_end)

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    k_base = KV + tl.cast(layer, tl.int64) * stride_kl + kv_head * stride_kh  # int64: a large cache passes 2**31
    v_base = k_base + stride_kkv
    table = BlockTables + seq * stride_bt
    scale = SCALE
    if FP8_CACHE:
        scale = SCALE * tl.load(KScale)
    n0 = start
    while n0 < end:
        m_i, l_i, acc = _attend_block(q, pos, m_i, l_i, acc, n0, end, table, k_base, v_base, stride_kb,
                                      stride_ks, dims, scale, BLOCK_SIZE, BLOCK_N, FP8_CACHE,
                                      WIDEN_TO_HALF)
        n0 += BLOCK_N
    if FP8_CACHE:
        acc = acc * tl.load(VScale)

    out_rows = split * stride_ms + token * stride_mt + head
    tl.store(Max + out_rows, m_i, mask=live)
    tl.store(Sum + out_rows, l_i, mask=live)
    acc_rows = split * stride_as + token * stride_at + head * stride_ah
    keyed = live & (m_i > float("-inf"))  # rows that saw no key of this split leave the merge only their max
    tl.store(Acc + acc_rows[:, None] + dims[None, :], acc, mask=keyed[:, None])


@triton.jit
def _merge_splits_kernel(Acc, Max, Sum, Out, stride_as, stride_at, stride_ah, stride_ms, stride_mt,
                         stride_ot, stride_oh, num_splits, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """out = sum_s acc_s * exp(m_s - m) / sum_s l_s * exp(m_s - m), with m the largest m_s. A split
    that saw no key has m_s = -inf and l_s = 0 and weighs nothing, so its accumulator, which may
    never have been stored, is not read; every row has a live split, since a query always sees its
    own key."""
    token, head = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    real = splits < num_splits
    m = tl.load(Max + splits * stride_ms + token * stride_mt + head, mask=real, other=float("-inf"))
    l = tl.load(Sum + splits * stride_ms + token * stride_mt + head, mask=real, other=0.0)
    w = tl.exp(m - tl.max(m, 0))
    acc = tl.load(Acc + splits[:, None] * stride_as + token * stride_at + head * stride_ah + dims[None, :],
                  mask=(m > float("-inf"))[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(Out + token * stride_ot + head * stride_oh + dims, out.to(Out.dtype.element_ty))


def paged_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, query_index: torch.Tensor, positions: torch.Tensor,
                           scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           splits: int | None = None, decode_tile: tuple[int, int] | None = None,
                           chunk_tile: tuple[int, int] = CHUNK_TILE) -> torch.Tensor:
    """`splits` is how many ranges a context is cut into (default: `split_count`, at most
    MAX_SPLITS); `decode_tile` is the (rows, keys per step) tile of a step where every sequence
    brings one token (default: DECODE_TILE, FP8_DECODE_TILE for an FP8 cache), `chunk_tile` that
    of a step with a prefill chunk. The op uses the defaults,
    bench/attention.py times others.

    Both kernels are launched, one of them with an empty grid: the step's kind is a symbolic size
    in the exported program (query_index's width), so it is computed into the grid rather than
    branched on, and AOTInductor's launcher, like Triton's, skips a launch with no programs."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[4], kv_cache.shape[3]
    batch, q_len = query_index.shape
    group = num_heads // num_kv_heads
    fp8_cache = k_scale is not None
    if not fp8_cache:  # the pointers are never read; any tensor stands in
        k_scale = v_scale = context_lens
    if decode_tile is None:
        decode_tile = FP8_DECODE_TILE if fp8_cache else DECODE_TILE
    group_pad = triton.next_power_of_2(group)
    decode_only = 1 - torch.sym_min(q_len - 1, 1)  # 1 when q_len is 1, else 0
    if splits is None:
        splits = split_count(batch, decode_only)
    acc = torch.empty(splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    maxes = torch.empty(splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
    sums = torch.empty(splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
    q, query_index = q.contiguous(), query_index.contiguous()
    decode_q, chunk_q = (max(1, rows // group_pad) for rows, _ in (decode_tile, chunk_tile))
    launches = ((decode_tile[1], decode_q, batch * decode_only),  # program b holds sequence b's token
                (chunk_tile[1], chunk_q, (batch + triton.cdiv(num_tokens, chunk_q)) * (1 - decode_only)))
    for block_n, block_q, programs in launches:
        wrap_triton(_paged_attention_kernel)[(programs, num_kv_heads, splits)](
            q, kv_cache, block_tables, context_lens, query_index, positions, acc, maxes, sums, k_scale, v_scale,
            layer, num_tokens, batch, q_len,
            q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
            kv_cache.stride(3), kv_cache.stride(4), block_tables.stride(0),
            acc.stride(0), acc.stride(1), acc.stride(2), maxes.stride(0), maxes.stride(1), splits,
            BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, HEAD_DIM=head_dim,
            BLOCK_N=block_n, SCALE=scale,  # a constexpr: AOTInductor passes float args as fp64
            SEQ_SCAN=SEQ_SCAN, FP8_CACHE=fp8_cache, WIDEN_TO_HALF=fp8_cache and q.dtype != torch.float32)
    out = torch.empty_like(q)
    # A symbolic count (the exported program's) is known only to be at most MAX_SPLITS.
    splits_pad = triton.next_power_of_2(splits if isinstance(splits, int) else MAX_SPLITS)
    wrap_triton(_merge_splits_kernel)[(num_tokens, num_heads)](
        acc, maxes, sums, out, acc.stride(0), acc.stride(1), acc.stride(2), maxes.stride(0), maxes.stride(1),
        out.stride(0), out.stride(1), splits, SPLITS_PAD=splits_pad, HEAD_DIM=head_dim, num_warps=1)
    return out


def split_count(batch, decode_only):
    """max(8, 32 // batch) for a decode step, 8 for a step with a chunk; see MIN_SPLITS. Both
    arguments may be symbolic sizes, so this is arithmetic, not a branch."""
    return torch.sym_max(MIN_SPLITS, decode_only * (MAX_SPLITS // batch))
