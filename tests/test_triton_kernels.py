"""The Triton kernels against their torch references: compiled on a GPU, and through Triton's
interpreter on CPU-only machines (conftest sets TRITON_INTERPRET=1 there), at small sizes.

Cases mix prefill chunks, chunks continuing a cached prefix and decode tokens, with odd lengths,
block-boundary positions, scattered block tables, and GQA groups that are not powers of two."""
import pytest
import torch

triton = pytest.importorskip("triton")

from llama_aot.kernels.paged_attention import paged_attention_reference  # noqa: E402
from llama_aot.kernels import triton_paged_attention  # noqa: E402
from llama_aot.kernels.triton_paged_attention import paged_attention_triton  # noqa: E402
from llama_aot.bench.paged_layout import blocks_for, scattered_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {
    "mixed": (6, 2, 16, 4, [(0, 7), (5, 1), (13, 6), (3, 1)]),
    "group_of_3": (9, 3, 16, 16, [(0, 40), (70, 1), (15, 2)]),
    "block_boundaries": (8, 2, 32, 16, [(15, 1), (16, 1), (31, 2), (0, 1)]),
    "llama_8b_heads": (32, 8, 64, 16, [(200, 1), (0, 33)]),
    # Chunks of several query tiles (32 rows each here) between decode tokens: each sequence's
    # programs are found by its first token, and a chunk's last tile is partly padding.
    "decodes_around_long_chunks": (4, 2, 16, 8, [(9, 1), (0, 45), (3, 1), (20, 70), (50, 1)]),
    # Every sequence brings one token: the decode tile's launch, not the chunk tile's.
    "decode_only": (32, 8, 64, 16, [(200, 1), (15, 1), (16, 1), (0, 1), (47, 1)]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_kernel_matches_reference(case, dtype):
    _check_against_reference(case, dtype)


@pytest.mark.parametrize("case", ["decodes_around_long_chunks", "decode_only"])
def test_other_tiles_match_reference(case):
    """The tile shapes bench/attention.py sweeps give the same answer, so its picks can become
    the defaults."""
    _check_against_reference(case, torch.float32, decode_tile=(32, 32), chunk_tile=(16, 32))


@pytest.mark.parametrize("case, splits", [("decode_only", 10), ("mixed", 3), ("llama_8b_heads", 32)])
def test_split_counts_match_reference(case, splits):
    """Counts that are not powers of two (batch 3 decodes get 10) and the largest the op uses."""
    _check_against_reference(case, torch.float32, splits=splits)


def test_split_count_follows_the_batch():
    """Small decode batches get more splits to fill the GPU, larger ones and chunked steps fewer."""
    counts = [triton_paged_attention.split_count(batch, 1) for batch in (1, 2, 3, 4, 64)]
    assert counts == [32, 16, 10, 8, 8]
    assert triton_paged_attention.split_count(1, 0) == triton_paged_attention.split_count(64, 0) == 8


def test_programs_find_their_sequence_in_several_passes(monkeypatch):
    """Steps with more sequences than one pass of the scan compares (128) still map every tile."""
    monkeypatch.setattr(triton_paged_attention, "SEQ_SCAN", 2)
    _check_against_reference("decodes_around_long_chunks", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32])
@pytest.mark.parametrize("case", ["mixed", "decode_only", "group_of_3"])
def test_fp8_cache_matches_reference(case, dtype):
    """An e4m3 cache with the layer's K and V scales (`--kv-cache-dtype fp8_e4m3`), decode and chunk
    tiles; a bf16 model's pages widen to float16 in the kernel, a float32 model's to float32."""
    _check_against_reference(case, dtype, fp8_scales=(0.03, 0.007))


def _check_against_reference(case, dtype, fp8_scales=None, **tiles):
    heads, kv_heads, head_dim, block_size, seqs = CASES[case]
    gen = torch.Generator().manual_seed(0)
    num_blocks = blocks_for(seqs, block_size)
    cache = torch.randn(2, 2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    scales = {}
    if fp8_scales is not None:  # values across e4m3's range, none past it
        cache = (cache * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        scales = dict(zip(("k_scale", "v_scale"), (torch.tensor(s, device=DEVICE) for s in fp8_scales)))
    step = scattered_step(seqs, block_size, num_blocks, gen, DEVICE)
    q = torch.randn(step["tokens"].shape[0], heads, head_dim, generator=gen).to(DEVICE, dtype)
    args = (q, cache, 1, step["block_tables"], step["context_lens"], step["query_index"], step["positions"],
            head_dim ** -0.5)
    expected = paged_attention_reference(*args, **scales).float()
    got = paged_attention_triton(*args, **scales, **tiles).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
