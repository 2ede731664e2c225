"""What `llama-compile` builds for this CPU when the command names no dtype and no weight format.

A CPU decode step at batch 1 is bound by reading the weights (docs/cpu.md). torch's int8
weight-only matmul (`aten._weight_int8pack_mm`, what `--int8` builds) reads a quarter of float32's
bytes, and it is vectorized for AVX-512 only: there the embedded default decodes about 4x faster
than in float32 (11.5 against 46 ms a token on a 2-core Xeon, docs/cpu.md), while a bfloat16 build was
no faster than float32 (oneDNN's bf16 GEMV at one row) and an AVX2 CPU would run the int8 matmul's
scalar loop. So a CPU build defaults to `--int8` where torch reports AVX-512, and to float32
elsewhere; `--dtype float32` (or any --dtype) builds exactly what it names. The cost is the
weights' rounding: its greedy agreement with HF is in docs/cpu.md.

Kept to plain builds: a tensor-parallel build cannot shard int8 matmuls, an EAGLE draft has not
been verified with them, and a pre-quantized FP8 checkpoint builds with its own FP8 weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from llama_aot.artifacts.config import BuildConfig

INT8_CAPABILITIES = ("AVX512",)  # torch.backends.cpu.get_cpu_capability() values with the vectorized int8 matmul


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def machine_default(build: BuildConfig, checkpoint: Path) -> tuple[BuildConfig, str | None]:
    """`build` (made from a command without --dtype, --int8 or --fp8) as this machine builds it by
    default, and a line saying what was chosen and why (None where nothing changes)."""
    if build.target != "cpu" or build.weight_quant != "none" or build.tp != 1 or build.speculative_algorithm:
        return build, None
    from llama_aot.compiler.checkpoint import open_checkpoint

    if open_checkpoint(checkpoint).prequantized:
        return build, None
    capability = cpu_capability()
    if capability not in INT8_CAPABILITIES:
        return build, (f"this CPU's vector ISA is {capability}, where torch's int8 matmul is not vectorized: "
                       f"building in {build.dtype}")
    # The KV cache follows the new dtype as `--kv-cache-dtype auto` does (build.kv_dtype holds the
    # float32 that auto resolved to); an FP8 cache stays FP8.
    kv_dtype = "auto" if build.kv_dtype == build.dtype else build.kv_dtype
    int8 = dataclasses.replace(build, weight_quant="int8", dtype=None, kv_dtype=kv_dtype, passes=None)
    return int8, (f"this CPU has {capability}: building --int8 (int8 weights, {int8.dtype} activations), "
                  "its fastest format here; --dtype float32 builds float32")
