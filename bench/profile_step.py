"""Where a decode step's time goes: CUDA kernels by total time per step, from graph replays.

    python -m llama_aot.bench.profile_step ARTIFACT [--batch 1] [--context 128] [--steps 32]

Prints the kernels sorted by time per step and the step's kernel count; the per-kernel split is
what tells a matmul-bound step from one that loses its time in small launches.
"""
from __future__ import annotations

import argparse
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
    with torch.inference_mode():
        loop = prepare_decode(artifact, args.batch, args.context, args.steps, cuda_graph=True)
        decode_steps(loop, args.steps)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            decode_steps(loop, args.steps)
            torch.cuda.synchronize()
    totals, counts = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total
            counts[event.name] += 1
    step_us = sum(totals.values()) / args.steps
    print(f"batch {args.batch}, context {args.context}: kernel time {step_us / 1e3:.3f} ms per step, "
          f"{sum(counts.values()) / args.steps:.0f} kernels per step")
    for name, total in sorted(totals.items(), key=lambda kv: -kv[1])[:30]:
        print(f"{total / args.steps:9.1f} us  {counts[name] / args.steps:6.1f}x  {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
