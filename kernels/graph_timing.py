"""Microseconds per call of a GPU operation, timed the way a decode step runs it: as nodes of a
CUDA graph, so launch overhead from Python is not in the figure. The build's kernel choices
(passes/quantize_fp8.py times the FP8 matmul modes on the building GPU) and the kernel tables
(bench/attention.py, bench/matmul.py) share this one timer, so their figures compare.
"""
from __future__ import annotations

import torch

CALLS = 24  # calls captured in one graph
REPLAYS = 7  # timed replays; the median is reported


def graph_time_us(fn_for, copies: int = 1) -> float:
    """Median over REPLAYS replays of a graph of CALLS calls `fn_for(i % copies)`, per call. With
    copies > 1 the calls cycle through inputs that together exceed L2 (matmul weights), so each
    call streams from HBM as in a real step. Warms up (and compiles) every copy on a side stream
    first, so that allocations happen outside the graph's pool."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn_for(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn_for(i % copies)
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return sorted(times)[len(times) // 2]
