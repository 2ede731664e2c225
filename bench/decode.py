"""`llama-bench decode`: decode speed of an artifact against HF transformers, in one process.

For each (batch, context) it prefills `batch` random prompts of `context` tokens (not timed), then
times `new_tokens` greedy decode steps, each fed the previous step's argmax (the runtime's
`greedy_tokens`). Both sides report the best of REPEATS timed runs: a single run moved HF's figure
by 5% between two calls on one machine. Several artifacts are timed in alternation, round by
round, and each later one is compared with the first pair by pair (bench/paired.py).
The step's inputs are advanced on the device from precomputed tables, as the runtime's decode
runner does, so the loop measures the program, not Python; with --cuda-graph the step is one graph
replay.

The peer baseline is HF transformers' LlamaForCausalLM on the same checkpoint with a static KV
cache and torch.compile, timed in the same process. Bandwidth is reported as a fraction of this
device's measured copy bandwidth (bytes read + written by a large device-to-device copy).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_step
from llama_aot.bench.paired import REPEATS
from llama_aot.runtime.sampling import greedy_tokens


@dataclass(frozen=True)
class DecodeResult:
    batch: int
    context: int
    ms_per_token: float
    tok_per_s: float
    bytes_per_step: int
    bandwidth_fraction: float
    round_ms_per_token: tuple[float, ...] = ()  # every timed run's, in order; ms_per_token is the least


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    synchronize(device)
    return 2 * nbytes * 10 / (time.perf_counter() - start)


def _prefill(artifact, cache, prompts, tables, block_size, budget, device):
    """Prefills all prompts in chunks that fit the program's token budget; returns last logits."""
    done, last = [0] * len(prompts), [None] * len(prompts)
    while min(d - len(p) for d, p in zip(done, prompts)) < 0:
        chunks, owners, left = [], [], budget
        for i, p in enumerate(prompts):
            n = min(len(p) - done[i], left)
            if n > 0:
                chunks.append(SequenceChunk(tuple(p[done[i]:done[i] + n]), done[i], tables[i]))
                owners.append(i)
                done[i] += n
                left -= n
        inputs = build_step_inputs(chunks, block_size, device)
        logits = call_step(artifact.step, inputs, cache)
        for row, i in enumerate(owners):
            last[i] = logits[row]
    return torch.stack(last)


@dataclass
class DecodeLoop:
    """A prefilled batch ready to decode: `set_step(i, tokens)` points the static inputs at step i
    and feeds `tokens`; `run()` executes one step (a graph replay when captured) and returns logits."""

    run: object
    set_step: object
    first: torch.Tensor
    cache: torch.Tensor


def prepare_decode(artifact, batch: int, context: int, new_tokens: int, cuda_graph: bool,
                   seed: int = 0) -> DecodeLoop:
    cfg, build = artifact.model_config, artifact.build_config
    device, bs = artifact.device_type, build.block_size
    layout = KVCacheLayout.of(cfg, build)
    per_seq = layout.blocks_for(context + new_tokens)
    tables = [tuple(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
    cache = layout.allocate(1 + batch * per_seq, device)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, cfg.vocab_size, (context,), generator=gen).tolist() for _ in range(batch)]
    with torch.inference_mode():
        first = greedy_tokens(_prefill(artifact, cache, prompts, tables, bs, build.max_num_tokens, device))

        # Static step inputs, advanced on the device: step i writes position context + i.
        step = build_step_inputs([SequenceChunk((0,), context, t) for t in tables], bs, device)
        table_t = step["block_tables"].long()
        pos_all = context + torch.arange(new_tokens, device=device)[:, None].expand(new_tokens, batch)
        slot_all = table_t.gather(1, (pos_all // bs).T).T * bs + pos_all % bs

        def set_step(i, tokens):
            step["tokens"].copy_(tokens)
            step["positions"].copy_(pos_all[i])
            step["slots"].copy_(slot_all[i])
            step["context_lens"].fill_(context + i + 1)

        run = lambda: call_step(artifact.step, step, cache)  # noqa: E731
        if cuda_graph:
            run = _capture(run)
        set_step(0, first)
        for i in range(3):  # warm-up steps write positions the timed steps overwrite
            set_step(i + 1, greedy_tokens(run()))
    return DecodeLoop(run, set_step, first, cache)


def decode_steps(loop: DecodeLoop, new_tokens: int) -> None:
    """Greedy decode of `new_tokens` steps, each fed the previous step's argmax."""
    loop.set_step(0, loop.first)
    for i in range(new_tokens):
        logits = loop.run()
        if i + 1 < new_tokens:
            loop.set_step(i + 1, greedy_tokens(logits))


def measure_decode(artifacts: list, batch: int, context: int, new_tokens: int, cuda_graph: bool,
                   bandwidth: float, rounds: int = REPEATS, seed: int = 0) -> list[DecodeResult]:
    """Times each artifact `rounds` times on the same prompts, taking turns (measure_cases)."""
    return measure_cases([(a, context) for a in artifacts], batch, new_tokens, cuda_graph, bandwidth, rounds, seed)


def measure_cases(cases: list[tuple], batch: int, new_tokens: int, cuda_graph: bool, bandwidth: float,
                  rounds: int = REPEATS, seed: int = 0,
                  after_round: Callable[[int], None] | None = None) -> list[DecodeResult]:
    """Times each (artifact, context) case `rounds` times, taking turns: even rounds in the given
    order, odd rounds reversed, so that over an even number of rounds each later case runs as often
    before the first as after it. One untimed run of each comes first: without it, on the CPU, an
    artifact compared with itself came out 10% slower than its copy, most of that in one round.
    Keeps every case's prefilled batch (and KV cache) in memory at once. `after_round(r)`, if given,
    runs untimed after round r: `llama-bench cpu` streams a served request there, so that the
    figures it compares come from the same minutes on a machine whose speed drifts."""
    loops = [prepare_decode(a, batch, context, new_tokens, cuda_graph and a.device_type == "cuda", seed)
             for a, context in cases]
    seconds = [[] for _ in cases]

    def timed_run(i):
        device = cases[i][0].device_type
        synchronize(device)
        start = time.perf_counter()
        decode_steps(loops[i], new_tokens)
        synchronize(device)
        seconds[i].append(time.perf_counter() - start)

    with torch.inference_mode():
        for loop in loops:
            decode_steps(loop, new_tokens)
        for r in range(rounds):
            for i in (range(len(cases)) if r % 2 == 0 else reversed(range(len(cases)))):
                timed_run(i)
            if after_round is not None:
                after_round(r)
    return [_result(a, loop, batch, context, new_tokens, runs, bandwidth)
            for (a, context), loop, runs in zip(cases, loops, seconds)]


def _result(artifact, loop: DecodeLoop, batch: int, context: int, new_tokens: int, runs: list[float],
            bandwidth: float) -> DecodeResult:
    cfg = artifact.model_config
    step_s = min(runs) / new_tokens
    weights = artifact.weight_bytes
    embed = cfg.vocab_size * cfg.hidden_size * loop.cache.element_size()
    kv_read = batch * (context + new_tokens // 2) * 2 * cfg.num_layers * cfg.kv_size * loop.cache.element_size()
    bytes_per_step = weights - embed + kv_read
    return DecodeResult(batch, context, step_s * 1e3, batch / step_s, bytes_per_step,
                        bytes_per_step / step_s / bandwidth, tuple(t / new_tokens * 1e3 for t in runs))


def _capture(fn):
    """Captures `fn` (reading and writing static tensors) in a CUDA graph; returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def hf_decode_ms(checkpoint, batch: int, context: int, new_tokens: int, seed: int = 0) -> float:
    """HF transformers with a static cache and torch.compile: ms per decode step. `generate`
    compiles the decode step itself when the cache is static (its CompileConfig: fullgraph,
    reduce-overhead, i.e. CUDA graphs); wrapping forward again would fight its graphs."""
    from transformers import CompileConfig, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.bfloat16).to("cuda").eval()
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).cuda()

    def generate(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(new_tokens)  # compile and capture
    prefill = min(generate(1) for _ in range(REPEATS))
    total = min(generate(new_tokens) for _ in range(REPEATS))
    del model
    torch.cuda.empty_cache()
    return (total - prefill) / (new_tokens - 1) * 1e3
