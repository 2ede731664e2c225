"""The decode_linear kernel against its torch reference: compiled on a GPU, and through Triton's
interpreter on CPU-only machines (conftest sets TRITON_INTERPRET=1 there), at small sizes.

Row counts from 1 to the kernel's 16 (32 for FP8 weights), output widths that do not fill the last column tile, K
that does not fill the last K step, and rows read through a stride (a slice of a wider tensor)."""
import pytest
import torch

triton = pytest.importorskip("triton")

from llama_aot.kernels.decode_linear import FP8_MAX_ROWS, MAX_ROWS, decode_linear_reference  # noqa: E402
from llama_aot.kernels.triton_decode_linear import Tiles, decode_linear_triton, launch_decode_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
CASES = {  # rows, out features, in features
    "one_row": (1, 48, 96),
    "odd_everything": (5, 37, 300),
    "full_tile": (MAX_ROWS, 64, 1030),
}


def _inputs(rows, n, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k + 5, generator=gen).to(DEVICE, dtype)[:, 3:k + 3]  # strided rows
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DEVICE, dtype)
    return x, weight


def _close(got, expected, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_decode_linear_kernel_matches_reference(case, dtype):
    x, weight = _inputs(*CASES[case], dtype, seed=len(case))
    got = decode_linear_triton(x, weight)
    assert got.shape == (x.shape[0], weight.shape[0]) and got.dtype == dtype
    _close(got, decode_linear_reference(x, weight), dtype)


def test_other_tiles_match_reference():
    """The tiles bench/matmul.py sweeps give the same answer, so its pick can become the default."""
    x, weight = _inputs(7, 70, 600, torch.float32, seed=9)
    expected = decode_linear_reference(x, weight)
    for tiles in (Tiles(16, 256, 3), Tiles(64, 256, 2, num_warps=8), Tiles(32, 256, 3, weight_first=True)):
        out = torch.full((7, 70), float("nan"), device=DEVICE)
        launch_decode_linear(x, weight, out, tiles)
        _close(out, expected, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_fp8_weights_with_column_scales_match_the_weight_only_reference(case, dtype):
    """`--fp8`'s weight-only mode at decode sizes: an e4m3 weight widened in registers, its
    per-output-channel scales applied to the accumulator."""
    from llama_aot.kernels.fp8_linear import WEIGHT_ONLY, fp8_linear_reference, quantize_rows

    x, weight = _inputs(*CASES[case], dtype, seed=len(case))
    q, scale = quantize_rows(weight.float() * torch.logspace(-2, 1, weight.shape[0], device=DEVICE)[:, None])
    got = decode_linear_triton(x, q, scale)
    assert got.shape == (x.shape[0], q.shape[0]) and got.dtype == dtype
    expected = fp8_linear_reference(x, q, scale, WEIGHT_ONLY)
    _close(got, expected, dtype)
    launch_decode_linear(x, q, got, Tiles(32, 256, 3, weight_first=True), scale)  # a tile the FP8 sweep tries
    _close(got, expected, dtype)


# (rows, output columns): each row band, with the narrow and the wide weights' tiles (from 16384
# columns) where they differ. The Triton interpreter takes seconds for the wide ones.
BANDS = [(1, 40), (3, 40), (MAX_ROWS + 1, 40), (FP8_MAX_ROWS, 40), (1, 20000), (3, 20000), (FP8_MAX_ROWS, 20000)]


@pytest.mark.parametrize("rows, n", BANDS)
def test_fp8_single_row_loop_and_the_rows_beyond_it_match_the_reference(rows, n):
    """The FP8 tiles' single-row loop (narrow tiles below 16384 columns, wide ones from there) and,
    for more rows, the two tensor-core tiles launched on grids the other kernels' sizes leave
    empty: every column written once, the programs past a kernel's columns writing nothing."""
    from llama_aot.kernels.fp8_linear import WEIGHT_ONLY, fp8_linear_reference, quantize_rows
    from llama_aot.kernels.triton_decode_linear import fp8_tiles

    x, weight = _inputs(rows, n, 300, torch.float32, seed=n + rows)
    q, scale = quantize_rows(weight)
    out = torch.full((rows, n), float("nan"), device=DEVICE)
    launch_decode_linear(x, q, out, fp8_tiles(n), scale)
    _close(out, fp8_linear_reference(x, q, scale, WEIGHT_ONLY), torch.float32)


@pytest.mark.parametrize("rows, n", [(1, 40), (3, 40), (FP8_MAX_ROWS, 40), (MAX_ROWS + 1, 20000)])
def test_fp8_gated_input_matches_the_activation_then_the_matmul(rows, n):
    """down_proj with the MLP's activation folded in (`fp8_gated_linear`): gate and up are the two
    halves of one gate_up output, read through its row stride, in every row band."""
    from llama_aot.kernels.fp8_linear import WEIGHT_ONLY, fp8_linear_reference, quantize_rows, silu_times
    from llama_aot.kernels.triton_decode_linear import fp8_tiles

    gen = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 600, generator=gen) * 3).to(DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    q, scale = quantize_rows((torch.randn(n, 300, generator=gen) / 300 ** 0.5).to(DEVICE))
    out = torch.full((rows, n), float("nan"), device=DEVICE)
    launch_decode_linear(gate, q, out, fp8_tiles(n), scale, up)
    # The kernel's float32 silu (x / (1 + exp(-x))) and torch's differ in the last bits.
    expected = fp8_linear_reference(silu_times(gate, up), q, scale, WEIGHT_ONLY)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_fp8_kernels_behind_a_row_count_known_only_at_run_time():
    """In an artifact the step's row count is symbolic: AOTInductor launches both FP8 kernels with
    grids computed from it, and exactly one of them runs. Right answers at every row count
    the kernels' bands meet at, with and without the MLP's activation folded in."""
    from llama_aot.kernels.fp8_linear import WEIGHT_ONLY, fp8_gated_linear, fp8_linear, quantize_rows, silu_times

    class Matmul(torch.nn.Module):
        def __init__(self):
            super().__init__()
            q, scale = quantize_rows(torch.randn(96, 300, device=DEVICE) / 300 ** 0.5)
            self.register_buffer("weight", q)
            self.register_buffer("scale", scale)

        def forward(self, x, gate_up):
            return (fp8_linear(x, self.weight, self.scale, WEIGHT_ONLY),
                    fp8_gated_linear(gate_up, self.weight, self.scale, WEIGHT_ONLY))

    model = Matmul()
    x = torch.randn(FP8_MAX_ROWS, 300, device=DEVICE, dtype=torch.bfloat16)
    gate_up = torch.randn(FP8_MAX_ROWS, 600, device=DEVICE, dtype=torch.bfloat16) * 3
    rows_dim = torch.export.Dim("rows", min=1, max=FP8_MAX_ROWS)
    program = torch.export.export(model, (x, gate_up), dynamic_shapes={"x": {0: rows_dim}, "gate_up": {0: rows_dim}})
    compiled = torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(program))
    w = model.weight.float() * model.scale[:, None]
    for rows in (1, 2, 5, MAX_ROWS, MAX_ROWS + 1, FP8_MAX_ROWS - 1, FP8_MAX_ROWS):
        # Against float32 maths on the same FP8 weights: the kernel widens them exactly and
        # accumulates in float32, where the reference would round the scaled weights to bf16 first.
        plain, gated = compiled(x[:rows].contiguous(), gate_up[:rows].contiguous())
        _close(plain, x[:rows].float() @ w.T, torch.bfloat16)
        _close(gated, silu_times(*gate_up[:rows].chunk(2, dim=-1)).float() @ w.T, torch.bfloat16)
