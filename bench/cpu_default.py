"""`llama-bench cpu`: the embedded default on this CPU, every figure issue 26 asks for in one run.

    llama-bench cpu [--artifact artifacts/default] [--checkpoint HF_DIR] [--new-tokens 128] [--out-dir DIR]

1. HF transformers' LlamaForCausalLM, eager, float32, on the same checkpoint: ms per decode step at
   batch 1 after a 128-token prompt (what a newcomer would run; `attn_implementation` as HF picks).
2. Then, taking turns round by round (each alone on the machine while it runs):
   - the artifact's own program (`llama-bench decode`'s loop, no server): ms per step at batch 1,
     contexts 128 and 8192 (less the new tokens where the artifact holds no more), the best round;
   - `llama-serve ARTIFACT` started as a user starts it, one request a round streamed through
     /v1/chat/completions (`llama-bench serve`'s client, greedy, ignore_eos): median TPOT and ITL.
Prints each figure and the ratios, and writes one JSON record to bench/results/.

llama.cpp, which the issue quotes, has no wheel for this machine (llama-cpp-python builds it from
source) and is not part of the run.
"""
from __future__ import annotations

import asyncio
import inspect
import platform
import time
from pathlib import Path

import torch

CONTEXTS = (128, 8192)
SERVER_START_TIMEOUT_S = 600  # loading the default and capturing its steps on a slow 2-core VM
SERVED_PROMPTS = ("Tell me about the history of the printing press.", "How do vaccines train the immune system?",
                  "Describe a walk through a forest in autumn.", "Explain how a bicycle stays upright.")


def cpu_name() -> str:
    from llama_aot.artifacts.target import describe_host

    return describe_host("cpu")["device_name"]


def hf_eager_ms(checkpoint: Path, context: int, new_tokens: int, rounds: int = 3, seed: int = 0) -> dict:
    """HF eager float32 at batch 1: the best of `rounds` timed runs of `new_tokens` greedy steps on
    a DynamicCache after a `context`-token random prompt, ms per step."""
    from transformers import DynamicCache, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    # transformers 5.x renames forward's past_key_values to cache; the cache object fills in place.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    runs = []
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first run warms up
            cache = DynamicCache(config=model.config)
            token = model(prompt, use_cache=True, **{cache_arg: cache}).logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens):
                token = model(token, use_cache=True, **{cache_arg: cache}).logits[:, -1:].argmax(-1)
            runs.append((time.perf_counter() - start) / new_tokens * 1e3)
    return {"ms_per_token": min(runs[1:]), "round_ms_per_token": runs[1:],
            "attn_implementation": model.config._attn_implementation, "threads": torch.get_num_threads()}


def program_and_served_ms(artifact_dir: Path, contexts: tuple[int, ...], new_tokens: int) -> tuple[dict, dict]:
    """The artifact's step program alone at batch 1, by context (a context the artifact cannot hold
    with `new_tokens` more is cut to the longest it can: SmolLM2's 8192 to 8064), and `llama-serve`
    on it, one streamed chat request at a time (median TPOT and ITL). They take turns, a round of
    the program at every context and then one served request, so that the ratios between them
    come from the same minutes: measured one after the other on this 2-core VM, whose speed drifts
    by 10-30 % from minute to minute, the same build came out anywhere from 1.7x to 2.4x at 8064."""
    from tokenizers import Tokenizer

    from llama_aot.bench.datasets import BenchInputError, BenchRequest
    from llama_aot.bench.decode import copy_bandwidth, measure_cases
    from llama_aot.bench.server_process import ServerProcess
    from llama_aot.bench.serving import ServeConfig, compute_metrics, run_benchmark
    from llama_aot.runtime.artifact import load_artifact

    artifact = load_artifact(artifact_dir, single_threaded=True)
    bandwidth = copy_bandwidth("cpu", 1 << 27)
    longest = artifact.build_config.context_length - new_tokens
    fits = sorted({min(c, longest) for c in contexts})
    tokenizer = Tokenizer.from_file(str(artifact_dir / "tokenizer.json"))
    served, seconds = [], 0.0
    server = ServerProcess([str(artifact_dir)])
    try:
        try:
            server.wait_healthy(SERVER_START_TIMEOUT_S)
        except RuntimeError as error:
            raise BenchInputError(str(error)[-2000:]) from None
        config = ServeConfig(server.base_url, backend="openai-chat", max_concurrency=1)

        def serve_one(r: int) -> None:
            nonlocal seconds
            prompt = SERVED_PROMPTS[r]
            outcome = asyncio.run(run_benchmark(config, [BenchRequest(prompt, len(tokenizer.encode(prompt).ids),
                                                                       new_tokens)]))
            served.extend(outcome.results)
            seconds += outcome.duration_s

        program = measure_cases([(artifact, c) for c in fits], 1, new_tokens, False, bandwidth,
                                rounds=len(SERVED_PROMPTS), after_round=serve_one)
    finally:
        server.stop()
    metrics = compute_metrics(served, seconds)
    if metrics.failed:
        raise BenchInputError(f"the served requests failed: {metrics.failures}")
    return ({r.context: {"ms_per_token": r.ms_per_token, "round_ms_per_token": list(r.round_ms_per_token)}
             for r in program},
            {"median_tpot_ms": metrics.tpot.median, "median_itl_ms": metrics.itl.median,
             "requests": metrics.completed, "output_tokens": metrics.total_output})


def run(artifact_dir: Path, checkpoint: Path, new_tokens: int) -> dict:
    from llama_aot.artifacts.manifest import read_manifest
    from llama_aot.compiler.package import git_sha

    manifest = read_manifest(artifact_dir)
    build = manifest.build
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; {artifact_dir}: {build.weight_quant} weights, "
          f"{build.dtype} activations", flush=True)
    hf = hf_eager_ms(checkpoint, CONTEXTS[0], new_tokens)
    print(f"HF transformers eager float32, context {CONTEXTS[0]}: {hf['ms_per_token']:.2f} ms/token", flush=True)
    program, served = program_and_served_ms(artifact_dir, CONTEXTS, new_tokens)
    for context, figures in program.items():
        print(f"the program alone, context {context}: {figures['ms_per_token']:.2f} ms/token", flush=True)
    short = program[CONTEXTS[0]]["ms_per_token"]
    record = {"device": cpu_name(), "arch": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": torch.get_num_threads(), "git_sha": git_sha(), "artifact": str(artifact_dir),
              "artifact_git_sha": manifest.producer["git_sha"], "weight_quant": build.weight_quant,
              "dtype": build.dtype, "new_tokens": new_tokens, "hf_eager_float32": hf,
              "program": {str(c): f for c, f in program.items()}, "served": served,
              "served_vs_hf_eager": hf["ms_per_token"] / served["median_tpot_ms"],
              "served_over_program": served["median_tpot_ms"] / short}
    longest = max(program)
    record["long_over_short_context"] = program[longest]["ms_per_token"] / short
    print(f"served: median TPOT {served['median_tpot_ms']:.2f} ms (ITL {served['median_itl_ms']:.2f}), "
          f"{record['served_vs_hf_eager']:.2f}x HF eager float32, {record['served_over_program']:.2f}x the program's "
          f"step; context {longest} at {record['long_over_short_context']:.2f}x context {CONTEXTS[0]}")
    return record
