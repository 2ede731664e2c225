"""Candidate designs for the FP8 weight-only GEMV at decode sizes, timed on the Llama-3.1-8B shapes
before one of them replaces kernels/triton_decode_linear.py's (which reads FP8 at 1-2.2 TB/s on the
H200, docs/fp8.md). Run on the GPU machine:

    python -m llama_aot.bench.fp8_gemv_candidates [ROWS, default 1,16] [OUT.json]

Each candidate is checked against x @ (W * s)^T, then timed as CUDA-graph replays with the weights
cycled past L2 (kernels/graph_timing.py), next to:
  bf16            cuBLAS on the bf16 weight
  shipped         the decode_linear kernel with fp8_tiles(N): at 1 row its single-row FMA loop
  scaled_mm_bare  torch._scaled_mm with unit tensor-wise scales, x already e4m3: the GEMM alone of
                  a per-token mode whose quantization Inductor fuses into x's producer
The candidates:
  fma             M = 1: W e4m3 -> fp32 in registers, x broadcast, an [BN, BK] accumulator summed
                  once at the end (no tensor cores, no shared-memory round trip)
  fma_h           the same with fp16 products (e4m3 -> f16 is one instruction per pair)
  fma_sk          fma split along K with fp32 atomics (zeroing and the bf16 cast included)
  dot8            tl.dot of e4m3 W by e4m3 x (x quantized per row beforehand), weight first
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

import llama_aot.kernels.decode_linear  # noqa: F401  (imports the Triton module in the order it needs)
from llama_aot.bench.results import save_results
from llama_aot.compiler.package import git_sha
from llama_aot.kernels.graph_timing import graph_time_us
from llama_aot.kernels.triton_decode_linear import fp8_tiles, launch_decode_linear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
FP8 = torch.float8_e4m3fn
STREAMED = 256 << 20
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def gemv_fma(X, W, S, Out, N, K, K_SPLIT, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k_start = pid_k * K_SPLIT
    w_ptrs = W + rn[:, None].to(tl.int64) * K + k_start + rk[None, :]
    x_ptrs = X + k_start + rk
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K_SPLIT, BK):
        w = tl.load(w_ptrs)
        x = tl.load(x_ptrs)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BK
        x_ptrs += BK
    y = tl.sum(acc, axis=1) * tl.load(S + rn)
    if SPLIT == 1:
        tl.store(Out + rn, y.to(Out.dtype.element_ty))
    else:
        tl.atomic_add(Out + rn, y, sem="relaxed")


@triton.jit
def gemv_fma_h(X, W, S, Out, N, K, BN: tl.constexpr, BK: tl.constexpr):
    """fp16 products (e4m3 -> f16 is one instruction per pair), fp32 accumulation."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    w_ptrs = W + rn[:, None].to(tl.int64) * K + rk[None, :]
    x_ptrs = X + rk
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        w = tl.load(w_ptrs).to(tl.float16)
        x = tl.load(x_ptrs).to(tl.float16)
        acc += (w * x[None, :]).to(tl.float32)
        w_ptrs += BK
        x_ptrs += BK
    y = tl.sum(acc, axis=1) * tl.load(S + rn)
    tl.store(Out + rn, y.to(Out.dtype.element_ty))


@triton.jit
def gemv_dot8(X8, W, S, XS, Out, M, N, K, BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    w_ptrs = W + rn[:, None].to(tl.int64) * K + rk[None, :]
    x_ptrs = X8 + rm[:, None] * K + rk[None, :]
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, K, BK):
        w = tl.load(w_ptrs)
        x = tl.load(x_ptrs)
        acc = tl.dot(w, tl.trans(x), acc)
        w_ptrs += BK
        x_ptrs += BK
    acc = acc * tl.load(S + rn)[:, None] * tl.load(XS + rm)[None, :]
    tl.store(Out + rm[None, :] * N + rn[:, None], acc.to(Out.dtype.element_ty), mask=rm[None, :] < M)


def then(launch, out):
    """Runs `launch` and returns `out` (a lambda's way of launching a kernel and returning its output)."""
    launch()
    return out


def variants(n, k, rows):
    """name -> (make(w8, s, x) -> fn() computing the product)."""
    v = {}
    if rows == 1:
        for bn in (8, 16, 32, 64):
            for bk in (128, 256, 512, 1024):
                if bn * bk > 16384 or bn * bk < 2048:
                    continue
                for warps in (2, 4, 8):
                    for stages in (1, 3):
                        def make(w8, s, x, bn=bn, bk=bk, warps=warps, stages=stages):
                            out = torch.empty(1, n, device=DEV, dtype=torch.bfloat16)
                            return lambda: then(lambda: gemv_fma[(n // bn, 1)](x, w8, s, out, n, k, k, BN=bn, BK=bk, SPLIT=1,
                                                                               num_warps=warps, num_stages=stages), out)
                        v[f"fma bn{bn} bk{bk} w{warps} s{stages}"] = make
        for bn, bk in ((16, 512), (32, 256), (32, 512)):
            for warps in (4, 8):
                def make(w8, s, x, bn=bn, bk=bk, warps=warps):
                    out = torch.empty(1, n, device=DEV, dtype=torch.bfloat16)
                    return lambda: then(lambda: gemv_fma_h[(n // bn,)](x, w8, s, out, n, k, BN=bn, BK=bk, num_warps=warps,
                                                                       num_stages=3), out)
                v[f"fma_h bn{bn} bk{bk} w{warps}"] = make
        for split in (2, 4, 7):
            if k % (split * 512):
                continue
            for bn, bk in ((16, 512), (32, 256), (32, 512)):
                def make(w8, s, x, bn=bn, bk=bk, split=split):
                    acc = torch.empty(1, n, device=DEV, dtype=torch.float32)

                    def fn():
                        acc.zero_()
                        gemv_fma[(n // bn, split)](x, w8, s, acc, n, k, k // split, BN=bn, BK=bk, SPLIT=split,
                                                   num_warps=4, num_stages=3)
                        return acc.to(torch.bfloat16)
                    return fn
                v[f"fma_sk{split} bn{bn} bk{bk}"] = make
    for bn in (64, 128):
        for bk in (128, 256, 512):
            for warps in (4, 8):
                def make(w8, s, x, bn=bn, bk=bk, warps=warps):
                    xs = x.float().abs().amax(dim=1).clamp(min=1e-12) / 448
                    x8 = torch.zeros(16, k, device=DEV, dtype=FP8)
                    x8[:rows] = (x.float() / xs[:, None]).to(FP8)
                    xs16 = torch.ones(16, device=DEV)
                    xs16[:rows] = xs
                    out = torch.empty(rows, n, device=DEV, dtype=torch.bfloat16)
                    return lambda: then(lambda: gemv_dot8[(n // bn,)](x8, w8, s, xs16, out, rows, n, k, BN=bn, BK=bk, BM=16,
                                                                      num_warps=warps, num_stages=3), out)
                v[f"dot8 bn{bn} bk{bk} w{warps}"] = make
    return v


def main():
    rows_list = [int(r) for r in (sys.argv[1] if len(sys.argv) > 1 else "1,16").split(",")]
    dev = torch.cuda.get_device_name()
    results = []
    for name, (n, k) in SHAPES.items():
        copies = max(1, -(-STREAMED // (n * k)))
        gen = torch.Generator(device=DEV).manual_seed(0)
        wb = [torch.randn(n, k, device=DEV, generator=gen, dtype=torch.bfloat16) for _ in range(copies)]
        s = wb[0].float().abs().amax(dim=1) / 448
        w8 = [(w.float() / s[:, None]).to(FP8) for w in wb]
        for rows in rows_list:
            x = torch.randn(rows, k, device=DEV, generator=gen, dtype=torch.bfloat16)
            ref = (x.float() @ (w8[0].float() * s[:, None]).T)
            row = {"shape": name, "rows": rows, "device": dev, "us": {}, "err": {}}
            row["us"]["bf16"] = graph_time_us(lambda i: x @ wb[i].T, copies)
            out = torch.empty(rows, n, device=DEV, dtype=torch.bfloat16)
            row["us"]["shipped"] = graph_time_us(lambda i: launch_decode_linear(x, w8[i], out, fp8_tiles(n), s), copies)
            x8 = (x.float() / (x.float().abs().amax() / 448)).to(FP8)
            pad = torch.zeros(16, k, device=DEV, dtype=FP8)
            pad[:rows] = x8
            one = torch.ones((), device=DEV)
            row["us"]["scaled_mm_bare"] = graph_time_us(
                lambda i: torch._scaled_mm(pad, w8[i].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), copies)
            for vname, make in variants(n, k, rows).items():
                try:
                    fns = [make(w, s, x) for w in w8]
                    got = fns[0]()
                    torch.cuda.synchronize()
                    err = ((got.float().reshape(rows, n) - ref).norm() / ref.norm()).item()
                    row["err"][vname] = err
                    if err > 0.05:
                        print(f"{name} rows {rows} {vname}: WRONG err {err:.3g}", flush=True)
                        continue
                    row["us"][vname] = graph_time_us(lambda i: fns[i](), copies)
                except Exception as e:  # noqa: BLE001
                    print(f"{name} rows {rows} {vname}: failed {type(e).__name__}: {str(e)[:150]}", flush=True)
            best = sorted(row["us"].items(), key=lambda kv: kv[1])[:6]
            gb = n * k / 1e3
            print(f"{name} rows {rows}: bf16 {row['us']['bf16']:.1f} shipped {row['us']['shipped']:.1f} "
                  f"scaled_mm_bare {row['us']['scaled_mm_bare']:.1f} | best: "
                  + "; ".join(f"{v} {t:.1f} ({gb / t:.0f} GB/s)" for v, t in best), flush=True)
            results.append(row)
        del wb, w8
        torch.cuda.empty_cache()
    sha = git_sha()
    print(save_results("fp8-gemv-candidates", [{**r, "git_sha": sha} for r in results],
                       Path(sys.argv[2]) if len(sys.argv) > 2 else None))


if __name__ == "__main__":
    main()
