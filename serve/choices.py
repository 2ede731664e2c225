"""A request's `n` completions of one prompt, prefilled once.

Each choice is its own engine request. The first runs alone until its prompt is prefilled (its
first token arrives); only then are the others submitted, so they find the prompt's full KV
blocks in the prefix cache and compute only the last partial block (`cached_tokens` in the
usage shows it). Submitted together, all n would prefill the prompt side by side in one step,
before any of its blocks were registered. With a `seed`, choice i samples with seed + i, so the
choices differ and the request stays reproducible.
"""
from __future__ import annotations

import asyncio
import dataclasses

from llama_aot.runtime.engine import Engine, RequestOutput
from llama_aot.runtime.sampling import SamplingParams
from llama_aot.serve.generation import Generation
from llama_aot.serve.metrics import Metrics

_SEED_MODULUS = 1 << 63


async def collect_choices(engine: Engine, metrics: Metrics, prompt: list[int], params: SamplingParams, n: int,
                          id_prefix: str, prompt_param: str, request) -> tuple[Generation, list[list[RequestOutput]]]:
    """The first choice's Generation (its id and time name the response) and every choice's
    outputs, in index order. A client that disconnects aborts all of them."""
    first = Generation(engine, metrics, prompt, params, id_prefix, prompt_param)
    tasks = [asyncio.ensure_future(first.collect(request))]
    if n > 1:
        prefilled = asyncio.ensure_future(first.prefilled.wait())
        await asyncio.wait([tasks[0], prefilled], return_when=asyncio.FIRST_COMPLETED)
        prefilled.cancel()
        for i in range(1, n):
            seeded = params if params.seed is None else dataclasses.replace(params, seed=(params.seed + i) % _SEED_MODULUS)
            choice = Generation(engine, metrics, prompt, seeded, id_prefix, prompt_param)
            tasks.append(asyncio.ensure_future(choice.collect(request)))
    try:
        return first, list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
