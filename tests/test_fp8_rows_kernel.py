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
    if DEVICE == "cuda" and k % 16 == 0:  # cuBLASLt's FP8 matmul takes K in multiples of 16 only
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


def test_a_tuned_tile_is_used_on_its_gpu_only(tmp_path, monkeypatch, request):
    """`--save-tuned` keeps other GPUs' entries; a GPU or shape not in the table gets the default."""
    from llama_aot.kernels import triton_fp8_rows as rows_module
    request.addfinalizer(rows_module.tuned_row_tiles.cache_clear)
    monkeypatch.setattr(rows_module, "TUNED_ROW_TILES", tmp_path / "tuned" / "fp8_row_tiles.json")
    rows_module.save_tuned_row_tiles("GPU A", {(4096, 14336): RowTiles(128, 256, 4, 3)})
    rows_module.save_tuned_row_tiles("GPU B", {(4096, 14336): RowTiles(32, 128, 8)})
    rows_module.save_tuned_row_tiles("GPU A", {(6144, 4096): RowTiles(64, 128, 2)})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU A")
    cuda = torch.device("cuda")
    assert row_tiles(4096, 14336, cuda) == RowTiles(128, 256, 4, 3)
    assert row_tiles(6144, 4096, cuda) == RowTiles(64, 128, 2)
    assert row_tiles(28672, 4096, cuda) == rows_module.default_row_tiles(28672, 4096)
    assert row_tiles(4096, 14336, torch.device("cpu")) == rows_module.default_row_tiles(4096, 14336)


def test_the_saved_tile_is_the_one_least_off_at_every_row_count():
    """A tile fastest at one row count but slow at another loses to one near the best at both; a
    tile not timed at every row count (out of resources there) is not chosen."""
    from llama_aot.bench.fp8_matmul import best_overall
    fast_at_32 = {"block_n": 32, "block_k": 128, "split_k": 4, "num_stages": 4, "num_warps": 4}
    steady = {**fast_at_32, "split_k": 2}
    partial = {**fast_at_32, "block_n": 128}
    timed = [{"rows": 32, "tiles": fast_at_32, "us": 30.0}, {"rows": 16, "tiles": fast_at_32, "us": 40.0},
             {"rows": 32, "tiles": steady, "us": 31.0}, {"rows": 16, "tiles": steady, "us": 26.0},
             {"rows": 16, "tiles": partial, "us": 20.0}]
    assert best_overall(timed) == RowTiles(**steady)
