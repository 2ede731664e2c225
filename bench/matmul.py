"""Decode-step matmuls: cuBLAS (`F.linear`) against the decode_linear kernel's tiles, on the
Llama-3.1-8B weight shapes, at decode batch sizes; and the greedy argmax against torch's.

    python -m llama_aot.bench.matmul [--m 1,8,16] [--shapes o,down,...] [--out-dir DIR]

Each timing replays a CUDA graph of calls that cycle through enough weight copies to exceed L2
(kernels/graph_timing.py), so the weight streams from HBM as in a real step. Reported:
microseconds per call (cuBLAS's split-K reduce kernel included where it runs one), weight GB/s,
the shipped tiles (`TILES`) and the best variant tried.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from llama_aot.bench.results import save_results
from llama_aot.compiler.package import git_sha
from llama_aot.kernels.decode_linear import MAX_ROWS
from llama_aot.kernels.graph_timing import graph_time_us
from llama_aot.kernels.triton_decode_linear import TILES, Tiles, launch_decode_linear
from llama_aot.runtime.sampling import greedy_tokens

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
L2_BYTES = 60 << 20
# 8 warps never won in matmul-20261130-154214.
VARIANTS = [Tiles(bn, bk, 3) for bn in (16, 32, 64) for bk in (256, 512, 1024)]


def time_shape(name: str, n: int, k: int, m: int, weights: list[torch.Tensor]) -> list[dict]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x, weights[0]).float()
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    results = {"cublas": graph_time_us(lambda i: F.linear(x, weights[i]), len(weights))}
    for tiles in dict.fromkeys([TILES] + VARIANTS):
        out.fill_(float("nan"))
        label = _label(tiles)
        try:
            launch_decode_linear(x, weights[0], out, tiles)
        except triton.runtime.errors.OutOfResources:  # its pipelined stages do not fit in shared memory
            continue
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            print(f"{name} m={m} {label}: WRONG (rel err {err})", flush=True)
            continue
        results[label] = graph_time_us(lambda i: launch_decode_linear(x, weights[i], out, tiles), len(weights))
    shipped_label = _label(TILES)
    best = min((v, lbl) for lbl, v in results.items() if lbl != "cublas")
    gbps = n * k * 2 / 1e3
    print(f"{name:9s} m={m:3d} cublas {results['cublas']:7.1f} us ({gbps / results['cublas']:5.0f} GB/s)  "
          f"shipped {results.get(shipped_label, float('nan')):7.1f}  best {best[0]:7.1f} [{best[1]}] "
          f"({gbps / best[0]:5.0f} GB/s, x{results['cublas'] / best[0]:.2f})", flush=True)
    return [{"what": "matmul", "shape": name, "n": n, "k": k, "m": m, "kernel": lbl, "shipped": lbl == shipped_label,
             "us": us, "weight_gbps": gbps / us} for lbl, us in results.items()]


def _label(tiles: Tiles) -> str:
    return f"n{tiles.block_n} k{tiles.block_k} s{tiles.num_stages} w{tiles.num_warps}"


def time_argmax(rows: int, vocab: int = 128256) -> dict:
    logits = torch.randn(rows, vocab, device="cuda")
    assert greedy_tokens(logits).tolist() == logits.argmax(-1).tolist()
    torch_us = graph_time_us(lambda i: logits.argmax(-1), 1)
    ours_us = graph_time_us(lambda i: greedy_tokens(logits), 1)
    print(f"argmax [{rows}, {vocab}] float32: torch {torch_us:.1f} us, greedy_tokens {ours_us:.1f} us", flush=True)
    return {"what": "argmax", "rows": rows, "vocab": vocab, "torch_us": torch_us, "greedy_tokens_us": ours_us}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", default="1,8,16")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"some of {', '.join(SHAPES)}")
    p.add_argument("--out-dir", type=Path, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    ms = [int(v) for v in args.m.split(",")]
    if max(ms) > MAX_ROWS:
        raise SystemExit(f"--m: the kernel takes at most {MAX_ROWS} rows")
    torch.manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies = max(2, -(-3 * L2_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in ms:
            rows += time_shape(name, n, k, m, weights)
        del weights
        torch.cuda.empty_cache()
    rows += [time_argmax(r) for r in (1, 8, 32)]
    device, sha = torch.cuda.get_device_name(), git_sha()
    print(save_results("matmul", [{"device": device, "git_sha": sha, **r} for r in rows], args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
