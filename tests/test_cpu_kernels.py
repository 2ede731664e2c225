"""The C++ CPU attention (kernels/cpu_kernels.py) against the torch reference it replaces, and how
it is built, refused and found in a compiled program."""
import pytest
import torch

from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs
from llama_aot.kernels import cpu_kernels
from llama_aot.kernels.paged_attention import paged_attention_reference

HEADS, KV_HEADS, HEAD_DIM, BLOCK, CACHED_SLOTS = 6, 2, 16, 4, 2048


def _step(case, gen, block=BLOCK):
    """Step inputs for chunks (cached tokens, new tokens) over scattered blocks of one cache."""
    perm = (torch.randperm(CACHED_SLOTS // block - 1, generator=gen) + 1).tolist()
    chunks, used = [], 0
    for start, n in case:
        blocks = -(-(start + n) // block)
        chunks.append(SequenceChunk(tuple(range(n)), start, tuple(perm[used:used + blocks])))
        used += blocks
    return build_step_inputs(chunks, block)


@pytest.mark.parametrize("block", [4, 32])  # 32: the vector kernel's full 16-slot tiles, two to a page
@pytest.mark.parametrize("head_dim", [16, 64, 128])  # 64, 128: the loops specialised for common head sizes
@pytest.mark.parametrize("query_dtype,cache_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float8_e4m3fn)])
@pytest.mark.parametrize("case", [
    [(5, 1), (700, 1), (1100, 1), (0, 1)],  # decode: contexts past one split (512 keys) and a first token
    [(0, 7), (5, 1), (13, 6), (3, 1)],      # prefill chunks with decode tokens: the matmul path
])
def test_cpu_attention_matches_the_reference(case, query_dtype, cache_dtype, head_dim, block):
    cpu_kernels.load()
    gen = torch.Generator().manual_seed(len(case))
    step = _step(case, gen, block)
    cache = torch.randn(2, 2, CACHED_SLOTS // block, block, KV_HEADS, head_dim, generator=gen).to(cache_dtype)
    q = torch.randn(step["tokens"].shape[0], HEADS, head_dim, generator=gen).to(query_dtype)
    scales = {"k_scale": torch.tensor(0.7), "v_scale": torch.tensor(1.3)} if cache_dtype.itemsize == 1 else {}
    args = (q, cache, 1, step["block_tables"], step["context_lens"], step["query_index"], step["positions"],
            head_dim ** -0.5)
    got = torch.ops.llama_aot.paged_attention_cpu(*args, **scales)
    expected = paged_attention_reference(*args, **scales)
    assert got.dtype == query_dtype
    tolerance = 1e-5 if query_dtype == torch.float32 else 2e-2  # the reference rounds scores to bf16
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_a_padding_row_gets_zeros():
    """A decode row whose query index is one past the last token (CUDA-graph padding) attends nothing."""
    cpu_kernels.load()
    gen = torch.Generator().manual_seed(3)
    step = _step([(9, 1), (2, 1)], gen)
    step["query_index"][1, 0] = 2  # no such token: the row is padding
    cache = torch.randn(1, 2, CACHED_SLOTS // BLOCK, BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
    q = torch.randn(2, HEADS, HEAD_DIM, generator=gen)
    out = torch.ops.llama_aot.paged_attention_cpu(q, cache, 0, step["block_tables"], step["context_lens"],
                                                  step["query_index"], step["positions"], 0.25)
    assert out[0].abs().sum() > 0 and out[1].abs().sum() == 0


def test_turned_off_or_unbuildable_is_a_clear_refusal(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_AOT_CPU_KERNELS", "0")
    with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match="LLAMA_AOT_CPU_KERNELS=0"):
        cpu_kernels.load()
    assert not cpu_kernels.available()

    monkeypatch.delenv("LLAMA_AOT_CPU_KERNELS")
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setattr(cpu_kernels, "_failure", None)
    monkeypatch.setenv("LLAMA_AOT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match="compiling cpu_paged_attention.cpp failed"):
        cpu_kernels.load()
    assert list((tmp_path / "cpu-kernels").iterdir()) == []  # nothing half-written left behind


def test_the_compiled_program_calls_the_cpu_kernel(tiny_artifact):
    """The build traces paged_attention's CPU branch into the C++ op, not the gathering reference."""
    assert cpu_kernels.called_by(tiny_artifact / "step.pt2")
