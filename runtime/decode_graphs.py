"""Decode steps as CUDA-graph replays: one graph per batch-size bucket, over static input buffers.

A decode step launches hundreds of small kernels; at small batch the GPU idles between launches
unless the whole step is replayed as one CUDA graph. A graph fixes its input addresses and shapes,
so the runner owns static buffers sized for the largest bucket and captures one graph per bucket
(SGLang's list: 1, 2, 4, 8, then multiples of 8). A step of n sequences is padded up to the
smallest bucket that holds it; pad rows decode token 0 at position 0 into slot 0 of the reserved
block 0, which no sequence reads, and their logits rows are dropped.

Block tables are as wide as the runtime's context in every bucket, so one graph serves any context
length: the attention reads only each sequence's `context_lens` worth of blocks.

The padding is plain tensor code and runs on CPU too, without a graph, so CPU tests can check it:
a padded step's real rows are exactly those of the same step with explicit pad sequences, and
match the unpadded step to rounding (a GEMM's rows may depend on how many rows it has).
"""
from __future__ import annotations

import time

import torch

from llama_aot.artifacts.kv_layout import slot_of
from llama_aot.artifacts.step_abi import SequenceChunk, call_step


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then multiples of 8, up to `max_batch`, which is always the last bucket so that
    every decode batch the scheduler can form has a graph."""
    if max_batch < 1:
        raise ValueError(f"max_batch {max_batch}: must be at least 1")
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return (*sizes, max_batch)


def is_decode_step(chunks: list[SequenceChunk]) -> bool:
    """Every chunk is one new token with one logits row: the only step shape a graph replays."""
    return all(len(c.tokens) == 1 and not c.all_logits for c in chunks)


class DecodeGraphs:
    """Runs decode steps of up to `max(buckets)` sequences, padded to a bucket, through `program`
    (a step program, or anything the step ABI can call), writing into `kv_cache`.

    Without `capture()` each padded step runs the program eagerly on the static buffers; after
    it, each bucket's step is a graph replay. The logits returned by a replay live in the graph's
    output buffer: they are valid until the next call.

    Filling the buffers is the step's only Python work, so it is kept small: tokens, positions
    and slots go to the device in one copy, and a block-table row is rewritten and copied only
    when its sequence's table changed (a new block every `block_size` steps, or another sequence
    in that row). Turning a full table into a tensor every step would cost milliseconds at long
    contexts. On CUDA the host buffers are pinned and copied asynchronously; the next fill waits
    for those copies before it writes the buffers again."""

    def __init__(self, program, kv_cache: torch.Tensor, buckets: tuple[int, ...], block_size: int,
                 context_length: int):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets {buckets}: must be increasing positive batch sizes")
        self.program, self.kv_cache, self.buckets, self.block_size = program, kv_cache, tuple(buckets), block_size
        size, self.width = buckets[-1], -(-context_length // block_size)
        device = kv_cache.device
        on_cuda = device.type == "cuda"
        self._host_vectors = torch.zeros(3, size, dtype=torch.int64, pin_memory=on_cuda)  # tokens, positions, slots
        self._host_lens = torch.ones(size, dtype=torch.int32, pin_memory=on_cuda)
        self._host_tables = torch.zeros(size, self.width, dtype=torch.int32, pin_memory=on_cuda)
        self._rows: list[tuple[int, ...]] = [()] * size  # the block table each host row holds
        host = (self._host_vectors, self._host_lens, self._host_tables)
        self._vectors, self._lens, self._tables = [t.to(device) for t in host] if on_cuda else host
        rows = torch.arange(size, dtype=torch.int64, device=device)
        self._static = {"tokens": self._vectors[0], "positions": self._vectors[1], "slots": self._vectors[2],
                        "block_tables": self._tables, "context_lens": self._lens, "query_index": rows[:, None],
                        "logits_index": rows}
        self._copied = torch.cuda.Event() if on_cuda else None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_s = 0.0

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def bucket_for(self, chunks: list[SequenceChunk]) -> int | None:
        """The smallest bucket that holds this step, or None if it is not a decode step that fits."""
        if not chunks or not is_decode_step(chunks):
            return None
        return next((b for b in self.buckets if b >= len(chunks)), None)

    def run(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """The step's logits, one row per chunk; raises ValueError for a step `bucket_for` refuses
        or a block table that cannot hold its token."""
        bucket = self.bucket_for(chunks)
        if bucket is None:
            raise ValueError(f"a step of {len(chunks)} chunks is not a decode step of at most "
                             f"{self.buckets[-1]} sequences; run it eagerly")
        self._fill(chunks, bucket)
        if bucket in self._graphs:
            graph, logits = self._graphs[bucket]
            graph.replay()
        else:
            logits = self._call(bucket)
        return logits[:len(chunks)]

    def capture(self) -> float:
        """Captures every bucket's graph, largest first so the smaller ones fit in the memory pool
        it leaves; returns (and keeps in `capture_s`) the seconds taken. The program must have been
        loaded single-threaded (`load_artifact(..., single_threaded=True)`)."""
        start = time.perf_counter()
        self._fill([], self.buckets[-1])  # all pad rows: capture writes only to the reserved block
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.kv_cache.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # lazy initialisation must not happen during capture
            for bucket in self.buckets:
                self._call(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        for bucket in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = self._call(bucket)
            self._graphs[bucket] = (graph, logits)
        torch.cuda.synchronize(self.kv_cache.device)
        self.capture_s = time.perf_counter() - start
        return self.capture_s

    def _call(self, bucket: int) -> torch.Tensor:
        with torch.inference_mode():
            return call_step(self.program, {n: t[:bucket] for n, t in self._static.items()}, self.kv_cache)

    def _fill(self, chunks: list[SequenceChunk], bucket: int) -> None:
        """Writes the step's rows, then pad rows up to `bucket`, and sends what changed to the
        device. Pad rows decode token 0 at position 0 into slot 0 (block 0, reserved) with a
        context of 1 and an empty block table. Slots follow build_step_inputs' convention."""
        if self._copied is not None:
            self._copied.synchronize()
        bs, pad = self.block_size, bucket - len(chunks)
        tokens, positions, slots = [], [], []
        for c in chunks:
            pos, table = c.start, c.block_table
            if not pos // bs < len(table) <= self.width:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {pos + 1} tokens "
                                 f"within {self.width} blocks")
            tokens.append(c.tokens[0])
            positions.append(pos)
            slots.append(slot_of(table, pos, bs))
        self._host_vectors[:, :bucket] = torch.tensor([tokens + [0] * pad, positions + [0] * pad,
                                                       slots + [0] * pad])
        self._host_lens[:bucket] = torch.tensor([p + 1 for p in positions] + [1] * pad, dtype=torch.int32)
        tables = [c.block_table for c in chunks] + [()] * pad
        changed = [i for i, table in enumerate(tables) if self._set_row(i, table)]
        if self._copied is not None:
            self._vectors.copy_(self._host_vectors, non_blocking=True)
            self._lens.copy_(self._host_lens, non_blocking=True)
            if changed:
                lo, hi = changed[0], changed[-1] + 1
                self._tables[lo:hi].copy_(self._host_tables[lo:hi], non_blocking=True)
            self._copied.record()

    def _set_row(self, i: int, table: tuple[int, ...]) -> bool:
        """Makes host row i hold `table` (zeros after it); returns whether it changed."""
        old = self._rows[i]
        if old == table:
            return False
        if len(table) >= len(old) and table[:len(old)] == old:  # the sequence grew by new blocks
            self._host_tables[i, len(old):len(table)] = torch.tensor(table[len(old):], dtype=torch.int32)
        else:
            self._host_tables[i, :len(old)] = 0
            self._host_tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
        self._rows[i] = table
        return True
