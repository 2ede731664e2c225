"""What the HTTP layer costs per streamed token, without a model: the server's CPU time per chunk.

    python -m llama_aot.bench.http_overhead [--streams 64] [--tokens 200] [--step-ms 10]

Starts `llama-serve`'s app in a child process over a stand-in engine that emits one token to every
running request each `--step-ms`, as the real engine's thread does after a step, then streams
`--streams` completions at once and reads the child's CPU time around them. At high concurrency
this is the event loop's budget: 100 streams at ~50 us a token fill half of a 10 ms step.
Runs anywhere (no GPU, no artifact: the tokenizer is a byte-level stand-in).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time


class _StandInEngine:
    """The Engine surface the app uses; every step sends each running request one token."""

    def __init__(self, tokenizer, step_s: float):
        from llama_aot.runtime.engine import EngineStats

        self.tokenizer, self.stats, self.step_s, self.steps = tokenizer, EngineStats(), step_s, 0
        self.runner = type("Runner", (), {"model_config": type("Config", (), {"vocab_size": 256})()})()
        self.runtime = type("Runtime", (), {"context_length": 1 << 16})()
        self._running: dict[str, list] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, request_id, prompt_ids, params, sink):
        with self._lock:
            self._running[request_id] = [sink, params.max_tokens, 0, len(prompt_ids)]

    def abort(self, request_id):
        with self._lock:
            self._running.pop(request_id, None)

    def _loop(self):
        from llama_aot.runtime.engine import RequestOutput

        deadline = time.perf_counter()
        while True:
            deadline += self.step_s
            time.sleep(max(0.0, deadline - time.perf_counter()))
            with self._lock:
                running = list(self._running.items())
            self.steps += 1
            for request_id, state in running:
                sink, max_tokens, done, prompt_len = state
                state[2] = done = done + 1
                finished = done >= max_tokens
                sink(RequestOutput(request_id, " a", 97, None, None, "length" if finished else None, prompt_len,
                                   done, 0))
                if finished:
                    self.abort(request_id)


def _serve(port: int, step_s: float) -> None:
    import uvicorn

    from llama_aot.bench.engine_overhead import stand_in_tokenizer
    from llama_aot.serve.app import ServeConfig, create_app

    engine = _StandInEngine(stand_in_tokenizer(), step_s)
    app = create_app(engine, None, ServeConfig(port=port))
    app.add_api_route("/steps", lambda: {"steps": engine.steps})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(base: str, pid: int, streams: int, tokens: int) -> tuple[int, float, float, int]:
    import httpx

    async def stream(client) -> int:
        body = {"prompt": [1, 2, 3], "max_tokens": tokens, "stream": True}
        async with client.stream("POST", base + "/v1/completions", json=body) as response:
            return sum([line.startswith("data: {") async for line in response.aiter_lines()])

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=streams + 4)) as client:
        for _ in range(300):
            try:
                await client.get(base + "/health")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.1)
        steps = (await client.get(base + "/steps")).json()["steps"]
        cpu, start = _cpu_seconds(pid), time.perf_counter()
        chunks = sum(await asyncio.gather(*[stream(client) for _ in range(streams)]))
        wall, cpu = time.perf_counter() - start, _cpu_seconds(pid) - cpu
        steps = (await client.get(base + "/steps")).json()["steps"] - steps
    return chunks, cpu, wall, steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--step-ms", type=float, default=10.0)
    p.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.serve_port:
        _serve(args.serve_port, args.step_ms / 1e3)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-m", "llama_aot.bench.http_overhead", "--serve-port", str(port),
                              "--step-ms", str(args.step_ms)])
    try:
        chunks, cpu, wall, steps = asyncio.run(_drive(f"http://127.0.0.1:{port}", child.pid, args.streams,
                                                      args.tokens))
    finally:
        child.send_signal(signal.SIGINT)
        child.wait(30)
    print(f"{args.streams} streams x {args.tokens} tokens: {chunks} chunks in {wall:.2f} s; server CPU "
          f"{cpu / chunks * 1e6:.0f} us per chunk; {wall / steps * 1e3:.2f} ms per engine step "
          f"(asked for {args.step_ms})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
