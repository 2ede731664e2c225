"""Handing each step's plan from rank 0 to the other ranks of a tensor-parallel server.

Every rank runs every step, in the same order (the programs' collectives pair the ranks up), so
rank 0 sends each StepPlan to every worker, over one pipe per worker, before it runs the step
itself. docs/tensor-parallel.md has the mechanisms measured against each other (a gloo broadcast,
pipes, a shared-memory mailbox); two things make pipes cheap enough:
- Block tables are sent as changes. They are most of a plan (64 sequences at 2000 tokens of
  context: 8000 block ids, ~0.5 ms to pickle and unpickle), yet a decode step's table is the
  previous step's table in the same row, or that plus one block. Both ends remember the last
  plan's tables by row, and a row whose table extends the one before sends only its new blocks.
- A worker polls its pipe for POLL_WINDOW_S after each step before it blocks on it: under load
  the next plan arrives within the window and is read without the wake-up of a sleeping process;
  an idle server's workers sleep.
"""
from __future__ import annotations

import pickle
import select
import time
from multiprocessing.connection import Connection

from llama_aot.artifacts.step_abi import SequenceChunk
from llama_aot.runtime.model_runner import StepPlan

PLAN, PROBE, STOP = b"P", b"M", b"S"  # run the step; only decode it (start-up timing); leave
POLL_WINDOW_S = 0.05  # longer than a decode step of a large model, so serving's plans meet a polling worker


class PlanSender:
    """Rank 0's end: encodes each plan once and writes it to every worker's pipe."""

    def __init__(self, conns: list[Connection]):
        self._conns = conns
        self._rows: list[tuple[int, ...]] = []

    def send(self, plan: StepPlan, kind: bytes = PLAN) -> None:
        """Raises OSError (BrokenPipeError) if a worker has gone."""
        data = kind + self._encode(plan)
        for conn in self._conns:
            conn.send_bytes(data)

    def stop(self) -> None:
        """Asks every worker still reading to leave its loop."""
        for conn in self._conns:
            try:
                conn.send_bytes(STOP)
            except OSError:
                pass

    def _encode(self, plan: StepPlan) -> bytes:
        rows, entries = self._rows, []
        for i, c in enumerate(plan.chunks):
            table = c.block_table
            kept = len(rows[i]) if i < len(rows) else 0
            if kept and table[:kept] != rows[i]:
                kept = 0
            entries.append((c.tokens, c.start, kept, table[kept:], c.all_logits))
        self._rows = [c.block_table for c in plan.chunks]
        return pickle.dumps((entries, plan.sample_rows), protocol=pickle.HIGHEST_PROTOCOL)


class PlanReceiver:
    """A worker's end: `receive()` returns (PLAN or PROBE, plan) or (STOP, None)."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._poll = select.poll()
        self._poll.register(conn.fileno(), select.POLLIN)
        self._rows: list[tuple[int, ...]] = []

    def receive(self) -> tuple[bytes, StepPlan | None]:
        """Raises EOFError once rank 0 has gone."""
        deadline = time.monotonic() + POLL_WINDOW_S
        while not self._poll.poll(0) and time.monotonic() < deadline:
            pass
        data = self._conn.recv_bytes()
        kind = data[:1]
        return (kind, None) if kind == STOP else (kind, self._decode(data[1:]))

    def _decode(self, data: bytes) -> StepPlan:
        entries, sample_rows = pickle.loads(data)
        rows, chunks = self._rows, []
        for i, (tokens, start, kept, blocks, all_logits) in enumerate(entries):
            chunks.append(SequenceChunk(tokens, start, rows[i] + blocks if kept else blocks, all_logits))
        self._rows = [c.block_table for c in chunks]
        return StepPlan(tuple(chunks), sample_rows)


def timing_plans(max_num_seqs: int, max_num_tokens: int, context_length: int, block_size: int,
                 steps: int = 30) -> dict[str, list[StepPlan]]:
    """Plan streams shaped like serving's, for timing the hand-over: successive decode steps of one
    sequence and of up to 64, at half the context, and prefill chunks of a full step's tokens."""
    context = context_length // 2
    blocks = -(-(context + steps) // block_size)

    def decode(n: int) -> list[StepPlan]:
        tables = [list(range(1 + i * blocks, 1 + i * blocks + context // block_size + 1)) for i in range(n)]
        plans = []
        for step in range(steps):
            position = context + step
            for i, table in enumerate(tables):
                if position // block_size == len(table):
                    table.append(1 + i * blocks + len(table))
            plans.append(StepPlan(tuple(SequenceChunk((100 + i,), position, tuple(table))
                                        for i, table in enumerate(tables)), tuple(range(n))))
        return plans

    n = min(64, max_num_seqs)
    chunk = min(max_num_tokens, context_length - 1)
    prefill = [StepPlan((SequenceChunk(tuple(range(step, step + chunk)), 0,
                                       tuple(range(1 + step, 1 + step + -(-chunk // block_size)))),), (chunk - 1,))
               for step in range(steps)]
    return {"1-sequence decode": decode(1), f"{n}-sequence decode": decode(n), f"{chunk}-token prefill": prefill}
