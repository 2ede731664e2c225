"""The load generator behind `llama-bench serve`: streamed OpenAI requests, timed per token.

Every request streams with temperature 0, ignore_eos and `stream_options.include_usage`, so each
request generates exactly its sampled output length and the server's usage, not the number of SSE
chunks (the detokenizer may hold text back or merge tokens), is the output token count. Whatever
goes wrong with a request (refused connection, non-200, a stream that is not SSE+JSON, a timeout)
becomes a failed result with its reason: the run always ends, and the summary always prints. The
one exception is a 404 on the warmup request (a --model the server does not serve, or a route it
lacks): an input error of the bench, one line and exit status 2, rather than a measurement.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx

from llama_aot.bench.datasets import BenchInputError, BenchRequest

# bench_serving's --backend names for the OpenAI routes (its "sglang" drives SGLang's native
# /generate, which llama-serve does not serve: here it drives /v1/completions like "sglang-oai").
COMPLETION_BACKENDS = ("sglang", "sglang-oai", "vllm", "lmdeploy", "openai")
CHAT_BACKENDS = ("sglang-oai-chat", "vllm-chat", "lmdeploy-chat", "openai-chat")
BACKENDS = COMPLETION_BACKENDS + CHAT_BACKENDS
_CHAT_OF = {"sglang": "sglang-oai-chat", "sglang-oai": "sglang-oai-chat", "vllm": "vllm-chat",
            "lmdeploy": "lmdeploy-chat", "openai": "openai-chat"}


def resolve_backend(backend: str, chat: bool = False) -> str:
    """The backend to drive: `chat` (our --chat) turns a completions backend into its chat twin
    (ServeConfig refuses a name that is not in BACKENDS)."""
    return _CHAT_OF[backend] if chat and backend in _CHAT_OF else backend


@dataclass(frozen=True)
class ServeConfig:
    """How to drive the server: where, which model, which backend (and so which route), how hard."""

    base_url: str
    model: str | None = None
    backend: str = "sglang"
    request_rate: float = math.inf
    max_concurrency: int | None = None
    timeout_s: float = 300.0
    seed: int = 0
    api_key: str | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be positive (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout must be positive, got {self.timeout_s}")

    @property
    def chat(self) -> bool:
        return self.backend in CHAT_BACKENDS

    @property
    def route(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


@dataclass
class RequestResult:
    """What one request measured; `error` is None on success (`status` is the HTTP status of a
    refused one). Times are seconds; `start` is the perf_counter() at which it was sent."""

    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str | None = None
    start: float = 0.0
    generated_text: str = ""
    status: int | None = None

    @property
    def success(self) -> bool:
        return self.error is None


class StreamError(Exception):
    """The response was not the stream an OpenAI server sends."""


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: exponential gaps (Poisson arrivals) at `rate` per
    second, or none at all for an infinite rate, as bench_serving does."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


def _payload(cfg: ServeConfig, model: str, req: BenchRequest) -> dict:
    body = {"model": model, "max_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if cfg.chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _delta_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


async def _stream(client: httpx.AsyncClient, cfg: ServeConfig, model: str, req: BenchRequest) -> RequestResult:
    result = RequestResult(prompt_len=req.prompt_len)
    start = last = result.start = time.perf_counter()
    pieces = []
    usage, done = None, False
    async with client.stream("POST", cfg.base_url + cfg.route, json=_payload(cfg, model, req)) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            try:
                body = json.loads(body)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            result.error = f"HTTP {response.status_code}: {' '.join(str(body).split())[:200]}"
            result.status = response.status_code
            return result
        async for line in response.aiter_lines():
            if not line.strip() or line.startswith(":"):
                continue
            if not line.startswith("data:"):
                raise StreamError(f"not an SSE data line: {line[:80]!r}")
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise StreamError(f"data is not JSON: {data[:80]!r}") from None
            if not isinstance(chunk, dict):
                raise StreamError(f"data is not a JSON object: {data[:80]!r}")
            if "error" in chunk:
                result.error = f"server error in stream: {str(chunk['error'])[:200]}"
                return result
            if chunk.get("usage"):
                usage = chunk["usage"]
            if text := _delta_text(chunk):
                pieces.append(text)
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
    result.latency = time.perf_counter() - start
    result.generated_text = "".join(pieces)
    if not done:
        raise StreamError("stream ended before data: [DONE]")
    if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
        raise StreamError("no usage chunk (stream_options.include_usage was requested)")
    result.output_len = usage["completion_tokens"]
    if isinstance(usage.get("prompt_tokens"), int):
        result.prompt_len = usage["prompt_tokens"]
    if result.ttft == 0.0:
        raise StreamError("the stream carried no text")
    return result


async def send_request(client: httpx.AsyncClient, cfg: ServeConfig, model: str, req: BenchRequest) -> RequestResult:
    """One streamed request; never raises, a failure is a result with its reason."""
    try:
        return await asyncio.wait_for(_stream(client, cfg, model, req), cfg.timeout_s)
    except asyncio.TimeoutError:
        reason = f"timeout after {cfg.timeout_s:g} s"
    except StreamError as e:
        reason = f"malformed stream: {e}"
    except httpx.ConnectError as e:
        reason = f"connection failed: {e}" if str(e) else "connection failed"
    except httpx.HTTPError as e:
        reason = f"{type(e).__name__}: {e}"
    return RequestResult(prompt_len=req.prompt_len, error=reason)


async def first_model(client: httpx.AsyncClient, cfg: ServeConfig) -> str:
    """The first id from /v1/models; raises StreamError with the reason when there is none."""
    try:
        response = await asyncio.wait_for(client.get(cfg.base_url + "/v1/models"), cfg.timeout_s)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except asyncio.TimeoutError:
        raise StreamError(f"GET /v1/models: timeout after {cfg.timeout_s:g} s") from None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise StreamError(f"GET /v1/models: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class RunOutcome:
    """A finished run: per-request results in prompt order, the wall time of the measured part,
    the model actually driven, and the server's speculative accept length over the run (None
    when it reports none)."""

    results: list[RequestResult]
    duration_s: float
    model: str
    accept_length: float | None = None


SPEC_COUNTERS = ("llama_aot_spec_verify_steps_total", "llama_aot_spec_accepted_drafts_total")


async def spec_counters(client: httpx.AsyncClient, cfg: ServeConfig) -> tuple[float, float] | None:
    """The server's verify steps and accepted drafts from /metrics, or None where it has none
    (another server, or one without a draft program)."""
    try:
        response = await asyncio.wait_for(client.get(cfg.base_url + "/metrics"), cfg.timeout_s)
    except (httpx.HTTPError, asyncio.TimeoutError):
        return None
    if response.status_code != 200:
        return None
    values = dict(line.rsplit(" ", 1) for line in response.text.splitlines() if line and not line.startswith("#"))
    if not all(name in values for name in SPEC_COUNTERS):
        return None
    return tuple(float(values[name]) for name in SPEC_COUNTERS)


def accept_length(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """Tokens per verify step over the run (accepted drafts plus the target's own), as SGLang's
    bench_serving prints it; None without verify steps."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return 1 + (after[1] - before[1]) / (after[0] - before[0])


async def run_benchmark(cfg: ServeConfig, requests: list[BenchRequest]) -> RunOutcome:
    """One warmup request, then every request on the arrival schedule under the concurrency cap.
    If the model lookup or the warmup fails, nothing more is sent and every request carries that
    reason: a dead server costs one timeout, not one per request."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.max_concurrency or len(requests) or 1, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.timeout_s)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = cfg.model
        try:
            model = model or await first_model(client, cfg)
        except StreamError as e:
            return RunOutcome([RequestResult(r.prompt_len, error=str(e)) for r in requests], 0.0, "unknown")
        warm = await send_request(client, cfg, model, requests[0])
        if warm.status == 404:  # a wrong --model (or a server without this route): an input error
            raise BenchInputError(_not_found(cfg, model, warm.error))
        if not warm.success:
            reason = f"not sent, warmup failed: {warm.error}"
            return RunOutcome([RequestResult(r.prompt_len, error=reason) for r in requests], 0.0, model)
        gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

        async def limited(req: BenchRequest) -> RequestResult:
            if gate is None:
                return await send_request(client, cfg, model, req)
            async with gate:
                return await send_request(client, cfg, model, req)

        counters = await spec_counters(client, cfg)
        start = time.perf_counter()
        tasks = []
        gaps = arrival_gaps(len(requests), cfg.request_rate, cfg.seed)
        for i, req in enumerate(requests):  # the first goes at once, then a gap before each next one
            tasks.append(asyncio.create_task(limited(req)))
            if i + 1 < len(requests) and gaps[i]:
                await asyncio.sleep(gaps[i])
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        return RunOutcome(list(results), duration, model, accept_length(counters, await spec_counters(client, cfg)))


def _not_found(cfg: ServeConfig, model: str, error: str) -> str:
    where = f"{cfg.base_url}{cfg.route} answered {error}"
    if cfg.model is not None:
        return (f"--model {model!r} is not served there ({where}); leave --model out to drive the model "
                "the server lists first, or pass the id it serves")
    return f"{where}; check --backend and --base-url (or --host/--port)"


@dataclass(frozen=True)
class Summary:
    """Distribution of one latency, in milliseconds."""

    mean: float
    median: float
    p95: float
    p99: float
    max: float

    @staticmethod
    def of(values_s: list[float]) -> "Summary":
        """Linear-interpolated percentiles (numpy's default, as bench_serving); zeros when empty."""
        import numpy as np

        if not values_s:
            return Summary(0.0, 0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(values_s, dtype=float) * 1000
        return Summary(float(ms.mean()), float(np.median(ms)), float(np.percentile(ms, 95)),
                       float(np.percentile(ms, 99)), float(ms.max()))


@dataclass(frozen=True)
class Metrics:
    """The run's figures over its successful requests; failures are counted by reason."""

    completed: int
    failed: int
    failures: dict[str, int]
    duration_s: float
    total_input: int
    total_output: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    concurrency: float
    ttft: Summary
    tpot: Summary
    itl: Summary
    e2e: Summary
    accept_length: float | None = None
    peak_output_throughput: float = 0.0
    peak_concurrency: int = 0
    total_output_retokenized: int | None = None


def peak_rates(ok: list[RequestResult]) -> tuple[float, int]:
    """bench_serving's peaks, from the measured times, in one-second buckets from the first send:
    the most text-carrying chunks (its "output tokens") arriving in one bucket, and the most
    requests whose [send, end] span touches one bucket."""
    if not ok:
        return 0.0, 0
    first = min(r.start for r in ok)
    buckets = int(math.ceil(max(r.start + r.latency for r in ok) - first)) + 1
    chunks, in_flight = [0] * buckets, [0] * buckets
    for r in ok:
        t = r.start + r.ttft
        for gap in [0.0, *r.itl]:
            t += gap
            if 0 <= int(t - first) < buckets:
                chunks[int(t - first)] += 1
        for second in range(int(r.start - first), min(int(r.start + r.latency - first) + 1, buckets)):
            in_flight[second] += 1
    return float(max(chunks)), max(in_flight)


def compute_metrics(results: list[RequestResult], duration_s: float, accept_length: float | None = None,
                    retokenized_output: int | None = None) -> Metrics:
    """TPOT is (latency - TTFT) / (output tokens - 1) per request with more than one token; ITL
    pools the gaps between text-carrying chunks of all requests; concurrency is the summed request
    latency over the wall time, the mean number of requests in flight. `retokenized_output` is
    the generated text's token count by the client's tokenizer, where the caller counted it."""
    ok = [r for r in results if r.success]
    failures: dict[str, int] = {}
    for r in results:
        if not r.success:
            failures[r.error] = failures.get(r.error, 0) + 1
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    peak_output, peak_in_flight = peak_rates(ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return Metrics(
        completed=len(ok), failed=len(results) - len(ok), failures=failures, duration_s=duration_s,
        total_input=total_in, total_output=total_out, request_throughput=per_s(len(ok)),
        input_throughput=per_s(total_in), output_throughput=per_s(total_out),
        total_throughput=per_s(total_in + total_out), concurrency=per_s(sum(r.latency for r in ok)),
        ttft=Summary.of([r.ttft for r in ok]),
        tpot=Summary.of([(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]),
        itl=Summary.of([gap for r in ok for gap in r.itl]),
        e2e=Summary.of([r.latency for r in ok]), accept_length=accept_length,
        peak_output_throughput=peak_output, peak_concurrency=peak_in_flight,
        total_output_retokenized=retokenized_output)
