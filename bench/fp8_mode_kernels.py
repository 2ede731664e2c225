"""Which kernels each per-token FP8 mode runs, compiled as the build times it and eager, and their
times: `python -m llama_aot.bench.fp8_mode_kernels` on a GPU with FP8 (~2 minutes).

The build (kernels/fp8_timing.py) times `fp8_linear` compiled by Inductor, and on the H100 the
per-token modes came out 15-25 us slower compiled than eager (docs/fp8.md, "Session 20"), so it
never chose them. Session 23's H100 build timed per_token_tiles 20-25 us above its kernel alone
(gate_up at 32 rows 70.5 us, the kernel 45.8). For o_proj, down_proj and gate_up at 1 and 32 rows,
this prints each form's time in a CUDA graph and its kernels: which of Inductor's kernels (the
activation quantization, the `_scaled_mm` call or our own kernel's launch) costs the difference.
On the H200 (session 22) the two forms came within 1-2 us of each other, and the build's choice
was limited by its single step-size boundary instead (docs/fp8.md, "Session 22")."""
from __future__ import annotations

from collections import defaultdict

import torch

from llama_aot.kernels.fp8_linear import FP8, PER_TOKEN, PER_TOKEN_EPILOGUE, PER_TOKEN_TILES, fp8_linear
from llama_aot.kernels.fp8_timing import compiled_mode
from llama_aot.kernels.graph_timing import graph_time_us

SHAPES = {"o": (4096, 4096), "down": (4096, 14336), "gate_up": (28672, 4096)}
ROWS = (1, 32)
PROFILED_CALLS = 10


def kernel_times_us(fn) -> dict[str, float]:
    """Microseconds per call of each CUDA kernel `fn` launches, over PROFILED_CALLS calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            fn()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / PROFILED_CALLS
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> int:
    for shape, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda").to(FP8)
        scale = torch.rand(n, device="cuda") + 0.5
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            if rows > 1:
                torch._dynamo.mark_dynamic(x, 0)  # as the build times it, and as the artifact runs it
            for mode in (PER_TOKEN, PER_TOKEN_EPILOGUE, PER_TOKEN_TILES):
                compiled = compiled_mode(mode)
                forms = {"compiled": lambda: compiled(x, weight, scale), "eager": lambda: fp8_linear(x, weight, scale, mode)}
                for form, fn in forms.items():
                    for _ in range(3):  # compiles, and warms up
                        fn()
                    graph_us = graph_time_us(lambda i: fn())
                    kernels = "; ".join(f"{us:.1f} {name[:70]}" for name, us in kernel_times_us(fn).items())
                    print(f"{shape} rows {rows} {mode} {form}: {graph_us:.1f} us in a graph; kernels: {kernels}",
                          flush=True)
            torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
