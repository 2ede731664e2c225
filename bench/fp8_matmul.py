"""FP8 weight matmuls against bf16 on the Llama-3.1-8B weight shapes: each `fp8_linear` mode
(kernels/fp8_linear.py) checked against the weight-only reference, then timed as the build times
it (kernels/fp8_timing.py) next to cuBLAS bf16, at decode and prefill step sizes. What
`quantize_fp8` would choose on this GPU, and what FP8 weights buy per matmul.

    python -m llama_aot.bench.fp8_matmul [--rows 1,16,128,2048] [--shapes qkv,o,...] [--out-dir DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llama_aot.bench.matmul import SHAPES
from llama_aot.bench.results import save_results
from llama_aot.compiler.package import git_sha
from llama_aot.kernels.decode_linear import MAX_ROWS
from llama_aot.kernels.fp8_linear import MODES, WEIGHT_ONLY, fp8_linear, fp8_linear_reference, quantize_rows
from llama_aot.kernels.fp8_timing import STREAMED_BYTES, time_modes
from llama_aot.kernels.graph_timing import graph_time_us


def check_modes(rows: int) -> dict[str, float]:
    """Each mode's relative error against the weight-only product, at `rows` rows (per-token
    modes add the activations' e4m3 rounding, about 2-3 %; a wrong scale shows as ~100 %)."""
    gen = torch.Generator(device="cuda").manual_seed(rows)
    q, scale = quantize_rows(torch.randn(1024, 4096, device="cuda", generator=gen))
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = fp8_linear_reference(x, q, scale, WEIGHT_ONLY).float()
    return {mode: ((fp8_linear(x, q, scale, mode).float() - ref).norm() / ref.norm()).item() for mode in MODES}


def time_shape(name: str, rows: list[int]) -> list[dict]:
    n, k = SHAPES[name]
    copies = max(1, -(-STREAMED_BYTES // (2 * n * k)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    bf16 = {}
    for r in rows:
        x = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
        bf16[r] = graph_time_us(lambda i: x @ weights[i].T, copies)
    del weights
    results = []
    for r, fp8 in time_modes((n, k), torch.bfloat16, tuple(rows)).items():
        best = min(fp8, key=fp8.get)
        print(f"{name:8s} rows {r:5d}: bf16 {bf16[r]:8.1f} us; " + ", ".join(f"{m} {t:.1f}" for m, t in fp8.items())
              + f"; best {best} ({bf16[r] / fp8[best]:.2f}x)", flush=True)
        results.append({"shape": name, "n": n, "k": k, "rows": r, "bf16_us": bf16[r], "fp8_us": fp8, "best": best})
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,16,128,2048")
    p.add_argument("--shapes", default="qkv,o,gate_up,down", help=f"some of {', '.join(SHAPES)}")
    p.add_argument("--out-dir", type=Path, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    checks = {rows: check_modes(rows) for rows in (1, 5, MAX_ROWS)}
    for rows, errors in checks.items():
        print(f"check at {rows} rows: " + ", ".join(f"{m} {e:.2e}" for m, e in errors.items()))
    rows = [int(r) for r in args.rows.split(",")]
    results = [r for name in args.shapes.split(",") for r in time_shape(name, rows)]
    device, sha = torch.cuda.get_device_name(), git_sha()
    print(save_results("fp8-matmul", [{"device": device, "git_sha": sha, "checks": checks, **r} for r in results],
                       args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
