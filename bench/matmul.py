"""Weight-matmul speed per regime: cuBLAS (`F.linear`) against our Triton tiles, on the
Llama-3.1-8B matmul shapes, at the token counts of decode and prefill.

    python -m llama_aot.bench.matmul [--m 1,8,16,32,64,256,2048] [--out FILE.json]

Each timing replays a CUDA graph of `REPS` launches that cycle through enough weight copies to
exceed L2, so the weight really streams from HBM (the 33 MB output projection fits in the H100's
50 MB L2). Reported: microseconds per call, weight GB/s, TFLOP/s, and the decode-step matmul time
the shapes add up to (32 layers + LM head).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from llama_aot.kernels.triton_linear import Tiles, launch_linear, regimes

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
PER_STEP = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}
REPS = 24
L2_BYTES = 50 << 20


def graph_time_us(fn_for, copies: int) -> float:
    """Median microseconds per call of `fn_for(i)` over a captured graph of REPS calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn_for(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(REPS):
            fn_for(i % copies)
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / REPS)
    return sorted(times)[len(times) // 2]


def candidates(n: int, k: int, m: int) -> dict[str, Tiles]:
    """The shipped regime for m, plus variants around it."""
    low = 0
    for tiles in regimes(n, k):
        if low < m and (tiles.max_m is None or m <= tiles.max_m):
            shipped = tiles
            break
        low = tiles.max_m
    out = {"shipped": shipped}
    if shipped.block_m == 16:
        for bn, bk, st, w in ((16, 256, 4, 4), (16, 512, 3, 4), (32, 256, 4, 4), (32, 512, 3, 4), (16, 1024, 3, 8),
                              (64, 128, 4, 4), (16, 512, 5, 4)):
            out[f"16x{bn}x{bk} s{st} w{w}"] = Tiles(16, 16, bn, bk, w, st)
    elif shipped.block_m == 64:
        for bm, bn, bk, st, w in ((32, 32, 128, 4, 4), (64, 64, 64, 4, 4), (64, 32, 256, 4, 4), (32, 64, 128, 4, 4)):
            out[f"{bm}x{bn}x{bk} s{st} w{w}"] = Tiles(64, bm, bn, bk, w, st)
    else:
        for bm, bn, bk, st, w in ((128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)):
            out[f"{bm}x{bn}x{bk} s{st} w{w}"] = Tiles(None, bm, bn, bk, w, st)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", default="1,8,16,32,64,256,2048")
    p.add_argument("--out")
    args = p.parse_args(argv)
    ms = [int(v) for v in args.m.split(",")]
    torch.manual_seed(0)
    rows, step = [], {}
    for name, (n, k) in SHAPES.items():
        copies = max(2, -(-3 * L2_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, weights[0]).float()
            results = {"cublas": graph_time_us(lambda i: F.linear(x, weights[i]), copies)}
            for label, tiles in candidates(n, k, m).items():
                out.fill_(float("nan"))
                launch_linear(x, weights[0], out, tiles)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    print(f"{name} m={m} {label}: WRONG (rel err {err})")
                    continue
                results[label] = graph_time_us(lambda i: launch_linear(x, weights[i], out, tiles), copies)
            weight_bytes = n * k * 2
            for label, us in results.items():
                rows.append({"shape": name, "n": n, "k": k, "m": m, "kernel": label, "us": us,
                             "weight_gbps": weight_bytes / us / 1e3, "tflops": 2 * m * n * k / us / 1e6})
            best = min((v, l) for l, v in results.items() if l != "cublas")
            print(f"{name:8s} m={m:5d} cublas {results['cublas']:8.1f} us ({weight_bytes / results['cublas'] / 1e3:5.0f} GB/s)"
                  f"  shipped {results.get('shipped', float('nan')):8.1f} us  best {best[0]:8.1f} us [{best[1]}]"
                  f"  ({weight_bytes / best[0] / 1e3:5.0f} GB/s, x{results['cublas'] / best[0]:.2f})", flush=True)
            for label in ("cublas", "shipped"):
                step.setdefault((m, label), 0.0)
                step[(m, label)] += PER_STEP[name] * results.get(label, float("nan"))
            step.setdefault((m, "best"), 0.0)
            step[(m, "best")] += PER_STEP[name] * best[0]
        del weights
        torch.cuda.empty_cache()
    for m in ms:
        print(f"decode-step matmuls at m={m}: cublas {step[(m, 'cublas')] / 1e3:.3f} ms, shipped "
              f"{step[(m, 'shipped')] / 1e3:.3f} ms, best {step[(m, 'best')] / 1e3:.3f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
