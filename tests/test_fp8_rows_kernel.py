"""The FP8 x FP8 decode-batch kernel (kernels/triton_fp8_rows.py, fp8_linear's per_token_tiles
mode) against the per-token product it stands for: compiled on a GPU, and through Triton's
interpreter on CPU-only machines (conftest sets TRITON_INTERPRET=1 there), at small sizes.

Row counts within one row block and past it, output widths that do not fill the last column
tile, K that does not fill the last K step nor split evenly, rows read through a stride, and the
split-K reduction against the single pass."""
import pytest
import torch

pytest.importorskip("triton")

from llama_aot.kernels.fp8_linear import FP8, PER_TOKEN, fp8_linear_reference, quantize_rows  # noqa: E402
from llama_aot.kernels.triton_fp8_rows import RowTiles, fp8_rows_triton, row_tiles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(rows: int, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k + 3, generator=gen)[:, 1:k + 1]  # strided rows
    weight, scale = quantize_rows(torch.randn(n, k, generator=gen) / k ** 0.5)
    return x.to(DEVICE, torch.bfloat16), weight.to(DEVICE), scale.to(DEVICE)


@pytest.mark.parametrize("rows, n, k, tiles", [
    (1, 48, 256, RowTiles(32, 128, 1)),
    (5, 70, 300, RowTiles(32, 128, 1)),       # a partial column tile and a partial K step
    (32, 64, 512, RowTiles(64, 128, 2)),      # one full row block, K in two splits
    (45, 96, 640, RowTiles(32, 128, 4)),      # two row blocks; the last split has one K step
    (9, 40, 300, RowTiles(32, 128, 4)),       # a split that starts past K adds nothing
])
def test_the_kernel_computes_the_per_token_product(rows, n, k, tiles):
    x, weight, scale = _operands(rows, n, k, seed=rows)
    xq, x_scale = quantize_rows(x)
    got = fp8_rows_triton(xq, x_scale, weight, scale, torch.bfloat16, tiles)
    expected = (xq.float() @ weight.float().T) * x_scale[:, None] * scale[None, :]
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)
    if DEVICE == "cuda":
        torch.testing.assert_close(got, fp8_linear_reference(x, weight, scale, PER_TOKEN), rtol=2e-2, atol=2e-2)


def test_splitting_k_adds_the_same_partial_sums_in_a_fixed_order():
    x, weight, scale = _operands(7, 64, 1024, seed=3)
    xq, x_scale = quantize_rows(x)
    whole = fp8_rows_triton(xq, x_scale, weight, scale, torch.float32, RowTiles(32, 128, 1))
    split = fp8_rows_triton(xq, x_scale, weight, scale, torch.float32, RowTiles(32, 128, 4))
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(split, fp8_rows_triton(xq, x_scale, weight, scale, torch.float32, RowTiles(32, 128, 4)))


def test_narrow_weights_get_their_k_split_and_wide_ones_do_not():
    """Llama-3.1-8B's shapes: the 4096-wide weights have 64-128 column tiles, too few programs for
    the SMs alone; gate_up's 28672 columns have enough."""
    down, gate_up = row_tiles(4096, 14336), row_tiles(28672, 4096)
    assert gate_up.split_k == 1 and 28672 // gate_up.block_n >= 256
    assert 4096 // down.block_n * down.split_k >= 256 and 14336 // (down.block_k * down.split_k) >= 4
