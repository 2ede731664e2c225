"""`llama-bench sweep`: the seed serving scenarios in one go, so every run of the project measures
the same shapes and the JSONL lines can be compared across commits.

Random scenarios use fixed lengths (range ratio 1.0, as published 1000/1000 figures do) and send
four prompts per concurrency slot (at least 8), so each level reaches its steady state. --scale
shrinks lengths, prompt counts and concurrencies together to keep the sweep runnable on CPU.
--scenarios picks some of them, in the order given, so a run with little device time left can
start with the scenarios it needs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from llama_aot.bench.results import RESULTS_DIR

PROMPTS_PER_SLOT = 4


@dataclass(frozen=True)
class Scenario:
    name: str
    dataset: str
    num_prompts: int
    concurrency: int | None
    input_len: int = 0
    output_len: int = 0

    def __post_init__(self):
        if self.dataset not in ("random", "sharegpt"):
            raise ValueError(f"unknown dataset {self.dataset!r}")
        if self.num_prompts < 1 or (self.concurrency is not None and self.concurrency < 1):
            raise ValueError(f"{self.name}: prompts and concurrency must be positive")
        if self.dataset == "random" and min(self.input_len, self.output_len) < 1:
            raise ValueError(f"{self.name}: random scenarios need positive lengths")


def seed_scenarios(scale: float = 1.0) -> list[Scenario]:
    """Random 1000/1000 at concurrency 1, 16, 100; random 8000/1000 at 1, 16, 64; ShareGPT, 100 prompts."""
    def s(x: int) -> int:
        return max(1, math.ceil(x * scale))

    scenarios = []
    for input_len, output_len, levels in ((1000, 1000, (1, 16, 100)), (8000, 1000, (1, 16, 64))):
        for c in dict.fromkeys(s(c) for c in levels):
            scenarios.append(Scenario(f"random-{s(input_len)}-{s(output_len)}-c{c}", "random",
                                      max(PROMPTS_PER_SLOT * c, 8), c, s(input_len), s(output_len)))
    scenarios.append(Scenario(f"sharegpt-{s(100)}", "sharegpt", s(100), None))
    return scenarios


def chosen_scenarios(names: list[str] | None, scale: float = 1.0) -> list[Scenario]:
    """The seed scenarios named in `names`, in that order (all of them when None)."""
    from llama_aot.bench.datasets import BenchInputError

    seeds = {sc.name: sc for sc in seed_scenarios(scale)}
    if names is None:
        return list(seeds.values())
    unknown = [n for n in names if n not in seeds]
    if unknown:
        raise BenchInputError(f"unknown scenario {', '.join(unknown)}; at this --scale they are: {', '.join(seeds)}")
    return [seeds[n] for n in dict.fromkeys(names)]


def sweep(args) -> list:
    """Runs every scenario against one server; writes one JSONL line per scenario, each run's
    latency CDFs, and throughput against concurrency, under --out-dir (default bench/results/)."""
    from llama_aot.bench.cli import (bench_tokenizer, build_requests, device_of, execute, local_tokenizer_dir,
                                     run_arguments, serve_config)
    from llama_aot.bench.report import plot_throughput_vs_concurrency

    scenarios = chosen_scenarios(args.scenarios, args.scale)
    tokenizer = bench_tokenizer(args, serve_config(args))  # one for all scenarios: a remote one keeps its cache
    device = device_of(local_tokenizer_dir(args))
    out_dir = args.out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{device.replace(' ', '-')}"
    output_file = out_dir / f"serve-sweep-{stamp}.jsonl"
    points: dict[str, list[tuple[float, float]]] = {}
    outcomes = []
    for sc in scenarios:
        print(f"\n{sc.name}: {sc.num_prompts} prompts, concurrency {sc.concurrency or 'unlimited'}")
        cfg = serve_config(args, sc.concurrency, request_rate=math.inf)
        requests = build_requests(args, cfg, sc.dataset, sc.num_prompts, sc.input_len, sc.output_len, 1.0,
                                  tokenizer=tokenizer)
        arguments = {**run_arguments(args), "scenario": sc.name, "dataset": sc.dataset, "num_prompts": sc.num_prompts,
                     "max_concurrency": sc.concurrency, "input_len": sc.input_len, "output_len": sc.output_len}
        metrics = execute(cfg, requests, arguments, output_file, args.plot, label=sc.name, tokenizer=tokenizer,
                          device=device)
        if sc.dataset == "random" and metrics.completed:
            points.setdefault(sc.name.rsplit("-c", 1)[0], []).append((metrics.concurrency, metrics.output_throughput))
            if args.plot:  # redrawn after every level, so a sweep cut short still leaves its chart
                print(f"wrote {plot_throughput_vs_concurrency(points, out_dir / f'serve-sweep-{stamp}-throughput.png')}")
        outcomes.append((sc, metrics))
    return outcomes
