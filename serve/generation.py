"""One request's life on the event loop: submit to the engine, receive its outputs as they come,
record its latencies, and abort it if the client goes away.

The engine calls the sink from its own thread; the sink only schedules a queue put on the event
loop, so neither side ever blocks the other.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from llama_aot.runtime.engine import Engine, RequestOutput
from llama_aot.runtime.sampling import SamplingParams
from llama_aot.serve.errors import APIError
from llama_aot.serve.metrics import Metrics

DISCONNECT_POLL_S = 0.2


class Generation:
    def __init__(self, engine: Engine, metrics: Metrics, prompt_ids: list[int], params: SamplingParams,
                 id_prefix: str, prompt_param: str):
        """`id_prefix` names the response object ("chatcmpl", "cmpl"); `prompt_param` is the field
        a too-long prompt is reported against."""
        self.engine, self.metrics = engine, metrics
        self.request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_ids = prompt_ids
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._start = time.monotonic()
        self._last_token_at: float | None = None
        self._finished = False
        self.prefilled = asyncio.Event()  # set at the first token (or the end): the prompt is in the cache
        try:
            engine.submit(self.request_id, prompt_ids, params, self._sink)
        except ValueError as e:
            raise APIError(400, str(e), prompt_param, "context_length_exceeded") from None

    def _sink(self, output: RequestOutput) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, output)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Yields every output up to the finishing one. Leaving early (the client disconnected,
        the task was cancelled) aborts the request, which frees its KV blocks."""
        try:
            while not self._finished:
                output = await self._queue.get()
                self._record(output)
                yield output
        finally:
            if not self._finished:
                self.engine.abort(self.request_id)

    def _record(self, output: RequestOutput) -> None:
        now = time.monotonic()
        if output.token_id is not None:
            if self._last_token_at is None:
                self.metrics.first_token(now - self._start)
            else:
                self.metrics.inter_token(now - self._last_token_at)
            self._last_token_at = now
        if output.token_id is not None or output.finish_reason is not None:
            self.prefilled.set()
        if output.finish_reason is not None:
            self._finished = True
            self.metrics.finished(output.finish_reason, output.prompt_tokens, output.completion_tokens,
                                  output.cached_tokens, now - self._start)

    async def collect(self, request) -> list[RequestOutput]:
        """All outputs of a non-streamed request; aborts it if the client disconnects meanwhile."""
        async def gather():
            return [o async for o in self.outputs()]

        task = asyncio.ensure_future(gather())
        while not task.done():
            await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
        return await task
