"""The fused pointwise Triton kernels (RoPE's tables, RoPE + KV-cache write, residual add + RMSNorm) against their
torch references: compiled on a GPU, and through Triton's interpreter on CPU-only machines (conftest
sets TRITON_INTERPRET=1 there), at small sizes.

q, k and v are column slices of one fused qkv tensor, as the fuse_qkv pass leaves them; head counts
are not powers of two, KV heads are shared (GQA), token counts are odd and slots run across block
boundaries into scattered blocks. The cache starts random, so a stray write shows."""
import pytest
import torch

triton = pytest.importorskip("triton")

from llama_aot.kernels.kv_cache import rope_write_kv_reference, rotary_tables_reference  # noqa: E402
from llama_aot.kernels.rms_norm import add_rms_norm_reference  # noqa: E402
from llama_aot.kernels.triton_rms_norm import add_rms_norm_triton  # noqa: E402
from llama_aot.kernels.triton_rope_kv import rope_write_kv_triton, rotary_tables_triton  # noqa: E402
from llama_aot.artifacts.config import ModelConfig, RopeScaling  # noqa: E402
from llama_aot.compiler.model import rope_inv_freq  # noqa: E402
from llama_aot.bench.paged_layout import blocks_for, scattered_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]

ROPE_CASES = {  # heads, kv_heads, head_dim, block_size, [(cached prefix, new tokens) per sequence]
    "gqa_group_of_3": (6, 2, 16, 4, [(0, 7), (5, 1), (2, 5)]),
    "mha_odd_heads": (3, 3, 8, 4, [(3, 1)]),
    "half_dim_not_pow2": (5, 1, 12, 8, [(6, 5), (15, 1), (16, 1)]),
}


def rope_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype):
    """cos, sin [T, head_dim] as the model builds them: float32 angles, rounded to the model dtype."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return rotary_tables_reference(positions.to(DEVICE), inv_freq.to(DEVICE), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_tables_kernel_matches_reference(dtype):
    """Llama 3.1's scaled frequencies (head_dim 128) at positions up to its 128K context, where the
    angles reach 1e5 radians and only an accurate range reduction keeps cos and sin right."""
    cfg = ModelConfig(vocab_size=8, hidden_size=256, intermediate_size=8, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=131072, tie_word_embeddings=False, rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=8192))
    positions = torch.tensor([0, 1, 7, 128, 8191, 8192, 65537, 131071], device=DEVICE)
    inv_freq = rope_inv_freq(cfg).to(DEVICE)
    got = rotary_tables_triton(positions, inv_freq, dtype)
    expected = rotary_tables_reference(positions, inv_freq, dtype)
    # bf16: at most one rounding apart where float32 cos lands next to a bf16 rounding boundary.
    atol = 1e-5 if dtype == torch.float32 else 2 ** -8
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.shape == (8, 128)
        torch.testing.assert_close(g, e, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_write_kv_kernel_matches_reference(case, dtype):
    heads, kv_heads, head_dim, block_size, seqs = ROPE_CASES[case]
    gen = torch.Generator().manual_seed(0)
    num_blocks = blocks_for(seqs, block_size)
    step = scattered_step(seqs, block_size, num_blocks, gen, DEVICE)
    num_tokens = step["tokens"].shape[0]
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in (q, k, v))
    cos, sin = rope_tables(step["positions"], head_dim, dtype)
    cache = torch.randn(2, 2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    expected_cache, got_cache = cache.clone(), cache.clone()

    expected_q = rope_write_kv_reference(q, k, v, cos, sin, expected_cache, 1, step["slots"])
    got_q = rope_write_kv_triton(q, k, v, cos, sin, got_cache, 1, step["slots"])

    # bf16: the GPU build can differ from the reference by one rounding (seen on the H200), never more.
    atol, rtol = (1e-6, 1e-6) if dtype == torch.float32 else (2 ** -6, 2 ** -7)
    torch.testing.assert_close(got_q, expected_q, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_cache, expected_cache, atol=atol, rtol=rtol)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[step["slots"]] = True
    untouched = ~written.view(num_blocks, block_size)
    assert torch.equal(got_cache[0], cache[0])
    assert torch.equal(got_cache[1][:, untouched], cache[1][:, untouched])


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_write_kv_kernel_quantizes_like_the_reference(case):
    """An e4m3 cache (`--kv-cache-dtype fp8_e4m3`): the same bytes as the reference's x / scale,
    clamped, for keys scaled far past the range and values within it. GPU only: Triton's
    interpreter (3.6) rounds float32 to e4m3 wrongly where rounding carries into the next power of
    two (127.9 became 64, not 128); compiled on the H200 the kernel wrote the reference's bytes."""
    heads, kv_heads, head_dim, block_size, seqs = ROPE_CASES[case]
    gen = torch.Generator().manual_seed(1)
    num_blocks = blocks_for(seqs, block_size)
    step = scattered_step(seqs, block_size, num_blocks, gen, DEVICE)
    num_tokens = step["tokens"].shape[0]
    q = torch.randn(num_tokens, heads, head_dim, generator=gen).to(DEVICE)
    k = (torch.randn(num_tokens, kv_heads, head_dim, generator=gen) * 30).to(DEVICE)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(DEVICE)
    cos, sin = rope_tables(step["positions"], head_dim, torch.float32)
    scales = torch.tensor(0.05, device=DEVICE), torch.tensor(0.004, device=DEVICE)
    cache = torch.zeros(2, 2, num_blocks, block_size, kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=DEVICE)
    expected_cache, got_cache = cache.clone(), cache.clone()
    expected_q = rope_write_kv_reference(q, k, v, cos, sin, expected_cache, 1, step["slots"], *scales)
    got_q = rope_write_kv_triton(q, k, v, cos, sin, got_cache, 1, step["slots"], *scales)
    torch.testing.assert_close(got_q, expected_q, atol=1e-6, rtol=1e-6)
    assert got_cache.float().abs().max() == 448  # some keys saturated, none became NaN
    assert torch.equal(got_cache.view(torch.uint8), expected_cache.view(torch.uint8))


ROWS_CASES = {  # rows, hidden
    "one_row": (1, 64),
    "odd_rows_hidden_not_pow2": (7, 48),
    "hidden_not_multiple_of_16": (5, 100),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ROWS_CASES))
def test_add_rms_norm_kernel_matches_reference(case, dtype):
    rows, hidden = ROWS_CASES[case]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, hidden + 3, generator=gen).to(DEVICE, dtype)[:, 1:hidden + 1]  # strided rows
    residual = torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)

    expected, expected_sum = add_rms_norm_reference(x, residual, weight, 1e-5)
    got, got_sum = add_rms_norm_triton(x, residual, weight, 1e-5)

    assert got.dtype == expected.dtype and got_sum.dtype == expected_sum.dtype
    assert torch.equal(got_sum, expected_sum)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: a last-bit rsqrt difference can flip a rounding
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
