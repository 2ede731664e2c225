"""Where a decode step's time goes: CUDA kernels by total time per step, from graph replays.

    python -m llama_aot.bench.profile_step ARTIFACT [--batch 1] [--context 128] [--steps 32]

Prints the kernels sorted by time per step and the step's kernel count; the per-kernel split is
what tells a matmul-bound step from one that loses its time in small launches. A CPU artifact's
step is profiled as it runs, by operator self time: the extern calls (matmuls, our C++ ops) by
name, and the rest of the step's wall time is the Inductor-generated C++ kernels between them,
which the profiler does not see.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from llama_aot.bench.decode import decode_steps, prepare_decode
from llama_aot.runtime.artifact import load_artifact


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args(argv)
    artifact = load_artifact(args.artifact, single_threaded=True)
    on_cuda = artifact.device_type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    with torch.inference_mode():
        loop = prepare_decode(artifact, args.batch, args.context, args.steps, cuda_graph=on_cuda)
        decode_steps(loop, args.steps)
        sync()
        start = time.perf_counter()
        decode_steps(loop, args.steps)
        sync()
        wall_us = (time.perf_counter() - start) * 1e6 / args.steps
        activity = torch.profiler.ProfilerActivity.CUDA if on_cuda else torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[activity]) as prof:
            decode_steps(loop, args.steps)
            sync()
    totals, counts = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if on_cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total
        elif not on_cuda and event.device_type == torch.autograd.DeviceType.CPU:
            totals[event.name] += event.self_cpu_time_total
        else:
            continue
        counts[event.name] += 1
    step_us = sum(totals.values()) / args.steps
    what = "kernel time" if on_cuda else "operator self time"
    print(f"batch {args.batch}, context {args.context}: step {wall_us / 1e3:.3f} ms unprofiled, {what} "
          f"{step_us / 1e3:.3f} ms per step, {sum(counts.values()) / args.steps:.0f} "
          f"{'kernels' if on_cuda else 'operator calls'} per step")
    for name, total in sorted(totals.items(), key=lambda kv: -kv[1])[:30]:
        print(f"{total / args.steps:9.1f} us  {counts[name] / args.steps:6.1f}x  {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
