"""Rank 0's side of the worker ranks: starting them, talking to them, watching them, stopping them.

Rank 0 is the serving process. It starts one process per other rank (runtime/tp_worker.py), which
loads its rank while rank 0 loads its own, joins their process group, then sends them the runtime
config it resolved and every step's plan (runtime/step_channel.py).

A monitor thread watches each worker's exit and its status pipe from the start: the first worker
to die or fail, at any point from start-up to shutdown, becomes one message naming its rank and
its error ("rank 1 exited with signal 9 (SIGKILL)", "rank 2 failed: ..."), handed once to
`on_failure`. That callback (the CLI's) decides what becomes of the server; it is called from the
monitor thread because rank 0 may be blocked where nothing else reaches it (joining a group a
worker never joins, a collective waiting on a dead rank).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from llama_aot.artifacts.tensor_parallel import join_group
from llama_aot.runtime.config import ResolvedRuntime
from llama_aot.runtime.model_runner import RunnerFailure, StepPlan
from llama_aot.runtime.step_channel import PROBE, PlanSender, timing_plans
from llama_aot.runtime.tp_worker import prepare_device, worker_main

STOP_TIMEOUT_S = 5.0
VERDICT_WAIT_S = 2.0  # how long an error on rank 0 waits for the monitor to find the rank behind it
_FAILED = object()


class RankFailure(RunnerFailure):
    """A rank failed or died: the ranks can no longer run steps together."""


@dataclass
class _Worker:
    rank: int
    process: Any  # a spawn-context Process
    plans: Connection
    status: Connection
    error: str | None = None

    def exit_message(self) -> str:
        if self.error is not None:
            return f"rank {self.rank} failed: {self.error}"
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"rank {self.rank} exited with signal {-code} ({signal.Signals(-code).name})"
        return f"rank {self.rank} exited with status {code}"


@dataclass
class _Monitor:
    events: "queue.SimpleQueue[Any]" = field(default_factory=queue.SimpleQueue)
    failure: str | None = None
    closing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    failed: threading.Event = field(default_factory=threading.Event)


class WorkerGroup:
    """Ranks 1..N-1 of an artifact built for N ranks, seen from rank 0."""

    def __init__(self, workers: list[_Worker], init_method: str, device_type: str,
                 on_failure: Callable[[str], None]):
        self._workers, self._on_failure = workers, on_failure
        self._init_method, self._device_type = init_method, device_type
        self._monitor = _Monitor()
        self._sender = PlanSender([w.plans for w in workers])
        self._configured = False
        threading.Thread(target=self._watch, name="llama-aot-rank-monitor", daemon=True).start()

    @classmethod
    def start(cls, path: Path, world_size: int, device_type: str, single_threaded: bool,
              on_failure: Callable[[str], None]) -> "WorkerGroup":
        """Starts the workers, which load their ranks meanwhile, and readies this process's device
        for rank 0. `on_failure(message)` is called once, from another thread, if a rank fails."""
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        workers = []
        for rank in range(1, world_size):
            worker_plans, plans = ctx.Pipe(duplex=False)  # (read end, write end)
            status, worker_status = ctx.Pipe(duplex=False)
            process = ctx.Process(target=worker_main, name=f"llama-aot-rank{rank}", daemon=True,
                                  args=(rank, world_size, device_type, init_method, path, single_threaded,
                                        os.getpid(), worker_plans, worker_status))
            process.start()
            worker_plans.close()  # the worker holds its ends; its pipes then break when it dies
            worker_status.close()
            workers.append(_Worker(rank, process, plans, status))
        prepare_device(0, world_size, device_type)
        return cls(workers, init_method, device_type, on_failure)

    def join(self) -> None:
        """Joins the workers' process group as rank 0; returns once every worker has loaded its
        rank and joined."""
        join_group(0, len(self._workers) + 1, self._device_type, self._init_method)

    def configure(self, runtime: ResolvedRuntime) -> None:
        """Sends every worker the runtime config rank 0 resolved; each then builds its runner
        with it and warms up."""
        for w in self._workers:
            self._guard(w.plans.send, runtime)
        self._configured = True

    def wait_all(self, kind: str) -> None:
        """Returns once every worker has reported `kind`: "prepared" (it has loaded its rank and
        built its runner) or "ready" (it has warmed up)."""
        for _ in self._workers:
            self._next_event(kind)

    def send(self, plan: StepPlan) -> None:
        if self._monitor.failure is not None:
            raise RankFailure(self._monitor.failure)
        self._guard(self._sender.send, plan)

    def time_handover(self, runtime: ResolvedRuntime) -> dict[str, float]:
        """Seconds from rank 0 starting to send a plan until the last worker holds it decoded,
        median over each stream of timing_plans (the workers only decode these)."""
        medians = {}
        for name, plans in timing_plans(runtime.max_num_seqs, runtime.max_num_tokens, runtime.context_length,
                                        runtime.block_size).items():
            latencies = []
            for plan in plans:
                start = time.perf_counter()
                self._guard(self._sender.send, plan, PROBE)
                latencies.append(max(self._next_event("probe")[2] for _ in self._workers) - start)
            medians[name] = statistics.median(latencies)
        return medians

    def failure_after(self, error: BaseException) -> RankFailure:
        """The RankFailure to raise for an error met on rank 0 while the ranks work together: a
        worker that died is usually behind it (a collective or a pipe broke), so its verdict is
        awaited a moment; otherwise rank 0 failed on its own, which leaves the workers a step
        ahead of it, so the group fails with rank 0 named."""
        if not self._monitor.failed.wait(VERDICT_WAIT_S):
            self._fail(f"rank 0 failed: {type(error).__name__}: {error}")
        return RankFailure(self._monitor.failure)

    def close(self) -> None:
        """Stops every worker: asked to leave if they were configured, then SIGTERM, then SIGKILL
        for one that will not; then leaves the group, unless a rank failed (NCCL may hang on a
        group with a dead rank, and the process is about to end). Safe to call more than once."""
        self._monitor.closing = True
        if self._configured and self._monitor.failure is None:
            self._sender.stop()
        deadline = time.monotonic() + STOP_TIMEOUT_S / 2
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()) if self._configured else 0)
        for stop in ("terminate", "kill"):
            alive = [w.process for w in self._workers if w.process.is_alive()]
            for p in alive:
                getattr(p, stop)()
            for p in alive:
                p.join(STOP_TIMEOUT_S / 4)
        if dist.is_initialized() and self._monitor.failure is None:
            dist.destroy_process_group()

    # ---- the monitor thread ------------------------------------------------------------------
    def _watch(self) -> None:
        waiting = {}
        for w in self._workers:
            waiting[w.process.sentinel] = waiting[w.status] = w
        while waiting:
            for ready in wait(list(waiting)):
                w = waiting[ready]
                if ready is w.status:
                    if not self._read_status(w):
                        del waiting[ready]
                    continue
                del waiting[ready]
                while w.status in waiting and w.status.poll() and self._read_status(w):
                    pass  # the error a failing worker sent just before it exited
                w.process.join()  # reaps it: its exit code is known from here on
                if not self._monitor.closing:
                    self._fail(w.exit_message())

    def _read_status(self, w: _Worker) -> bool:
        try:
            kind, value = w.status.recv()
        except (EOFError, OSError):
            return False
        if kind == "error":
            w.error = value
        else:
            self._monitor.events.put((w.rank, kind, value))
        return True

    def _fail(self, message: str) -> None:
        m = self._monitor
        with m.lock:
            if m.failure is not None:
                return
            m.failure = message
        self._on_failure(message)
        m.failed.set()
        m.events.put(_FAILED)

    def _next_event(self, kind: str) -> tuple[int, str, Any]:
        event = self._monitor.events.get()
        if event is _FAILED:
            self._monitor.events.put(_FAILED)  # for the next waiter
            raise RankFailure(self._monitor.failure)
        if event[1] != kind:
            raise RuntimeError(f"rank {event[0]} sent {event[1]!r} where {kind!r} was expected")
        return event

    def _guard(self, send, *args) -> None:
        try:
            send(*args)
        except OSError as e:  # a worker's pipe broke: it has died, or is dying
            raise self.failure_after(e) from e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
