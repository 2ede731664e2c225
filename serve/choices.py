"""A request's `n` completions of one prompt, prefilled once, whole or streamed.

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
from collections.abc import AsyncIterator

from llama_aot.runtime.engine import Engine, RequestOutput
from llama_aot.runtime.sampling import SamplingParams
from llama_aot.serve.generation import Generation
from llama_aot.serve.metrics import Metrics

_SEED_MODULUS = 1 << 63


class Choices:
    def __init__(self, engine: Engine, metrics: Metrics, prompt: list[int], params: SamplingParams, n: int,
                 id_prefix: str, prompt_param: str):
        """Submits the first choice now, so that a prompt the engine refuses is an error before
        any response starts; `id_prefix` and `prompt_param` as Generation takes them."""
        self.first = Generation(engine, metrics, prompt, params, id_prefix, prompt_param)
        self.request_id, self.created, self.n = self.first.request_id, self.first.created, n

        def later(i: int) -> Generation:
            seeded = params if params.seed is None else dataclasses.replace(params, seed=(params.seed + i) % _SEED_MODULUS)
            return Generation(engine, metrics, prompt, seeded, id_prefix, prompt_param)
        self._later = later

    async def collect(self, request) -> list[list[RequestOutput]]:
        """Every choice's outputs, in index order; a client that disconnects aborts all of them."""
        tasks = [asyncio.ensure_future(self.first.collect(request))]
        try:
            if self.n > 1:
                prefilled = asyncio.ensure_future(self.first.prefilled.wait())
                await asyncio.wait([tasks[0], prefilled], return_when=asyncio.FIRST_COMPLETED)
                prefilled.cancel()
                tasks += [asyncio.ensure_future(self._later(i).collect(request)) for i in range(1, self.n)]
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as the choices produce them, until every choice has finished.
        Leaving early (the client went away, an error was sent) aborts the unfinished ones."""
        queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        tasks: list[asyncio.Task] = []

        async def pump(index: int, gen: Generation) -> None:
            async for out in gen.outputs():
                queue.put_nowait((index, out))
                if index == 0 and len(tasks) == 1 and gen.prefilled.is_set():
                    tasks.extend(asyncio.ensure_future(pump(i, self._later(i))) for i in range(1, self.n))

        tasks.append(asyncio.ensure_future(pump(0, self.first)))
        finished = 0
        try:
            while finished < self.n:
                index, out = await queue.get()
                finished += out.finish_reason is not None
                yield index, out
        finally:
            for task in tasks:
                task.cancel()
