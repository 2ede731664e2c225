"""The token-count-dispatched Triton matmul against torch: every regime and its boundaries, ragged
N and K, fp32 on CPU through Triton's interpreter and fp32 + bf16 on a GPU."""
import pytest
import torch

triton = pytest.importorskip("triton")

from llama_aot.kernels.triton_linear import _in_range, linear_triton, regimes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUNDARIES = [1, 2, 16, 17, 63, 64, 65, 200]


def test_exactly_one_regime_runs_for_every_token_count():
    for n in (48, 4096, 128256):
        tiers = regimes(n, 4096)
        assert tiers[-1].max_m is None
        for m in range(1, 600):
            lows = [0] + [t.max_m for t in tiers[:-1]]
            assert sum(_in_range(m, lo, t.max_m) for lo, t in zip(lows, tiers)) == 1, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32])
@pytest.mark.parametrize("n, k", [(48, 64), (40, 96), (33, 80)])
def test_linear_matches_torch_across_regimes(n, k, dtype):
    gen = torch.Generator().manual_seed(n * k)
    weight = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    for m in BOUNDARIES:
        # A column slice of a wider activation: rows are not contiguous with each other.
        x = torch.randn(m, k + 8, generator=gen).to(DEVICE, dtype)[:, 3:3 + k]
        got = linear_triton(x, weight).double()
        expected = x.double() @ weight.double().T
        err = ((got - expected).norm() / expected.norm()).item()
        assert err < (1e-6 if dtype == torch.float32 else 1e-2), (m, err)
        assert got.shape == (m, n)


def test_linear_keeps_leading_dimensions():
    x = torch.randn(2, 3, 64).to(DEVICE)
    weight = torch.randn(32, 64).to(DEVICE)
    torch.testing.assert_close(linear_triton(x, weight), torch.nn.functional.linear(x, weight), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_compiled_program_picks_the_regime_at_run_time(tmp_path):
    """Through torch.export and AOTInductor with a symbolic token count: each call runs the one
    kernel whose grid is non-empty, in eager and in a CUDA-graph replay."""
    import llama_aot.kernels  # noqa: F401

    class Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(96, 64, dtype=torch.bfloat16) * 0.1)

        def forward(self, x):
            return torch.ops.llama_aot.linear(x, self.weight)

    model = Proj().cuda()
    x = torch.randn(20, 64, device="cuda", dtype=torch.bfloat16)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("m", min=1, max=512)}})
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "proj.pt2"))
    program = torch._inductor.aoti_load_package(path, run_single_threaded=True)
    for m in BOUNDARIES + [512]:
        x = torch.randn(m, 64, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(program(x), model(x), atol=2e-2, rtol=2e-2)
    static = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
    program(static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = program(static)
    static.copy_(torch.randn(3, 64, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    torch.testing.assert_close(out, model(static), atol=2e-2, rtol=2e-2)
