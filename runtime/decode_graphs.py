"""Steps of a fixed shape as CUDA-graph replays: one graph per batch-size bucket, over static input
buffers.

A decode step launches hundreds of small kernels; at small batch the GPU idles between launches
unless the whole step is replayed as one CUDA graph. A graph fixes its input addresses and shapes,
so the runner owns static buffers sized for the largest bucket and captures one graph per bucket
(SGLang's list: 1, 2, 4, 8, then multiples of 8). A step of n sequences is padded up to the
smallest bucket that holds it.

Three shapes are graphed, each by its own `DecodeGraphs` (model_runner.py builds them):
- a decode step: one token per sequence, logits for each (`tokens_per_seq` 1);
- EAGLE's verify step: each sequence's last token and its K drafts, a logits row for every one
  (`tokens_per_seq` K + 1, `all_logits`; a chunk must have exactly K + 1 tokens);
- the draft program's calls, which read a `hidden` row per token besides the step's inputs
  (`hidden_input`): its later calls are one token per sequence, its first call reads the 1 to K + 1
  tokens each sequence's verify step computed (`tokens_per_seq` K + 1 without `all_logits`: chunks
  are ragged, each padded to K + 1 rows, with logits at its last real token).

Pad rows write only slot 0 of the reserved block 0, which no sequence reads, and nothing reads
their outputs. A pad sequence decodes token 0 at position 0 with a context of 1 and an empty block
table, and its other rows are pad rows of its own. A ragged chunk's pad rows are queries of the
chunk's sequence, token 0 at its last real position: each query attends on its own, so they change
no real row, and every row of the step is a live query (a row no query covered would leave the
attention kernel's output for it, and then the K/V it writes to block 0, unset). Hence the query
index is a constant `[bucket, tokens_per_seq]` range in every shape.

Block tables are as wide as the runtime's context in every bucket, so one graph serves any context
length: the attention reads only each sequence's `context_lens` worth of blocks.

The padding is plain tensor code and runs on CPU too, without a graph, so CPU tests can check it:
a padded step's real rows match the unpadded step to rounding (a GEMM's rows may depend on how
many rows it has, and a ragged step's attention takes the multi-token path where the unpadded one
may take the decode path).
"""
from __future__ import annotations

import time

import torch

from llama_aot.artifacts.kv_layout import slot_of
from llama_aot.artifacts.step_abi import SequenceChunk, call_draft, step_outputs


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then multiples of 8, up to `max_batch`, which is always the last bucket so that
    every decode batch the scheduler can form has a graph."""
    if max_batch < 1:
        raise ValueError(f"max_batch {max_batch}: must be at least 1")
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return (*sizes, max_batch)


class DecodeGraphs:
    """Runs steps of up to `max(buckets)` sequences of up to `tokens_per_seq` tokens each, padded
    to a bucket, through `program` (a step program, or a draft program given `hidden_input`, its
    hidden rows' (width, dtype); anything the step ABI can call), writing into `kv_cache`.

    Without `capture()` each padded step runs the program eagerly on the static buffers; after
    it, each bucket's step is a graph replay. `run` returns every output of the program, one row
    per logits row, as views of the graph's output buffers: they are valid until that graph's next
    replay.

    Filling the buffers is the step's only Python work, so it is kept small: tokens, positions
    and slots go to the device in one copy, and a block-table row is rewritten and copied only
    when its sequence's table changed (a new block every `block_size` steps, or another sequence
    in that row). Turning a full table into a tensor every step would cost milliseconds at long
    contexts. One-token steps, the plain decode that most of serving is, lay out their rows in a
    loop of their own, twice as fast as the general one. On CUDA the host buffers are pinned and
    copied asynchronously; the next fill waits for those copies before it writes the buffers
    again."""

    def __init__(self, program, kv_cache: torch.Tensor, buckets: tuple[int, ...], block_size: int,
                 context_length: int, tokens_per_seq: int = 1, all_logits: bool = False,
                 hidden_input: tuple[int, torch.dtype] | None = None):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets {buckets}: must be increasing positive batch sizes")
        if tokens_per_seq < 1:
            raise ValueError(f"tokens_per_seq {tokens_per_seq}: must be at least 1")
        self.program, self.kv_cache, self.buckets, self.block_size = program, kv_cache, tuple(buckets), block_size
        self.tokens_per_seq, self.all_logits = tokens_per_seq, all_logits
        self.logits_rows_per_seq = tokens_per_seq if all_logits else 1
        # Chunks of 1 to tokens_per_seq tokens: their logits rows (and where their hidden rows go) vary.
        self._ragged = tokens_per_seq > 1 and not all_logits
        self._chunk_rows = self._one_token_rows if tokens_per_seq == 1 else self._padded_rows
        size, self.width = buckets[-1], -(-context_length // block_size)
        rows = size * tokens_per_seq
        device = kv_cache.device
        on_cuda = device.type == "cuda"
        # tokens, positions, slots; ragged: each sequence's logits row, each row's hidden input row
        self._host_vectors = torch.zeros(5 if self._ragged else 3, rows, dtype=torch.int64, pin_memory=on_cuda)
        self._host_lens = torch.ones(size, dtype=torch.int32, pin_memory=on_cuda)
        self._host_tables = torch.zeros(size, self.width, dtype=torch.int32, pin_memory=on_cuda)
        self._table_rows: list[tuple[int, ...]] = [()] * size  # the block table each host row holds
        host = (self._host_vectors, self._host_lens, self._host_tables)
        self._vectors, self._lens, self._tables = [t.to(device) for t in host] if on_cuda else host
        # The hidden rows run() is given, packed in chunk order; a ragged step spreads them to its rows.
        self._hidden = None if hidden_input is None else torch.zeros(rows, hidden_input[0], dtype=hidden_input[1],
                                                                     device=device)
        self._inputs = {bucket: self._bucket_inputs(bucket, torch.arange(rows, device=device)) for bucket in buckets}
        self._copied = torch.cuda.Event() if on_cuda else None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self.capture_s = 0.0

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def bucket_for(self, chunks: list[SequenceChunk]) -> int | None:
        """The smallest bucket that holds this step, or None if its chunks are not of this shape
        (all_logits as this one's, and exactly tokens_per_seq tokens each with all_logits, else 1
        to tokens_per_seq) or too many."""
        most, all_logits = self.tokens_per_seq, self.all_logits
        if not chunks or not all(len(c.tokens) <= most and c.all_logits == all_logits for c in chunks):
            return None
        if all_logits and any(len(c.tokens) < most for c in chunks):
            return None
        return next((b for b in self.buckets if b >= len(chunks)), None)

    def run(self, chunks: list[SequenceChunk], hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, ...] | None:
        """Every output of the program at the step's logits rows (one per chunk, or one per token
        with `all_logits`): `(logits,)` or `(logits, hidden)`; None for a step `bucket_for`
        refuses, which the caller runs eagerly. `hidden`: a draft program's input, one row per
        token of the chunks, in order. Raises ValueError for a block table that cannot hold its
        tokens, or `hidden` given to a program that takes none (or missing, or of another length)."""
        bucket = self.bucket_for(chunks)
        if bucket is None:
            return None
        self._fill(chunks, bucket)
        if self._hidden is not None or hidden is not None:
            self._take_hidden(chunks, hidden)
        if bucket in self._graphs:
            graph, outputs = self._graphs[bucket]
            graph.replay()
        else:
            outputs = self._call(bucket)
        rows = len(chunks) * self.logits_rows_per_seq
        return tuple([out[:rows] for out in outputs])

    def capture(self) -> float:
        """Captures every bucket's graph, largest first so the smaller ones fit in the memory pool
        it leaves; returns (and keeps in `capture_s`) the seconds taken. The program must have been
        loaded single-threaded (`load_artifact(..., single_threaded=True)`)."""
        start = time.perf_counter()
        self._fill([], self.buckets[-1])  # all pad sequences: capture writes only to the reserved block
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
                outputs = self._call(bucket)
            self._graphs[bucket] = (graph, outputs)
        torch.cuda.synchronize(self.kv_cache.device)
        self.capture_s = time.perf_counter() - start
        return self.capture_s

    def _bucket_inputs(self, bucket: int, token_rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The static buffers' first `bucket` sequences as the program's inputs by name."""
        n = bucket * self.tokens_per_seq
        logits_index = self._vectors[3] if self._ragged else token_rows
        inputs = {"tokens": self._vectors[0, :n], "positions": self._vectors[1, :n], "slots": self._vectors[2, :n],
                  "block_tables": self._tables[:bucket], "context_lens": self._lens[:bucket],
                  "query_index": token_rows[:n].view(bucket, self.tokens_per_seq),
                  "logits_index": logits_index[:bucket * self.logits_rows_per_seq]}
        if self._ragged:
            inputs["hidden_rows"] = self._vectors[4, :n]
        return inputs

    def _call(self, bucket: int) -> tuple[torch.Tensor, ...]:
        """The program on the static buffers; in a ragged step, the packed hidden rows are spread
        to the padded rows first and the per-token outputs are taken at the logits rows after, in
        the graph too."""
        inputs = self._inputs[bucket]
        with torch.inference_mode():
            if self._hidden is None:
                outputs = step_outputs(self.program, inputs, self.kv_cache)
            else:
                hidden = self._hidden.index_select(0, inputs["hidden_rows"]) if self._ragged else \
                    self._hidden[:bucket * self.tokens_per_seq]
                outputs = call_draft(self.program, inputs, hidden, self.kv_cache)
            if self._ragged:
                outputs = (outputs[0], *[out.index_select(0, inputs["logits_index"]) for out in outputs[1:]])
        return outputs

    def _take_hidden(self, chunks: list[SequenceChunk], hidden: torch.Tensor | None) -> None:
        """Copies a draft program's hidden rows, packed, into the static buffer the graphs read."""
        if self._hidden is None or hidden is None:
            raise ValueError("hidden rows go with the graphs of a draft program (hidden_input), and only there")
        tokens = sum(len(c.tokens) for c in chunks)
        if len(hidden) != tokens:
            raise ValueError(f"hidden of {len(hidden)} rows for {tokens} tokens")
        self._hidden[:tokens].copy_(hidden)

    def _fill(self, chunks: list[SequenceChunk], bucket: int) -> None:
        """Writes the step's rows, then pad sequences up to `bucket`, and sends what changed to the
        device. Slots follow build_step_inputs' convention."""
        if self._copied is not None:
            self._copied.synchronize()
        tokens, positions, slots, lens = self._chunk_rows(chunks)
        pad, rows = bucket - len(chunks), bucket * self.tokens_per_seq
        pad_rows = [0] * (rows - len(tokens))
        self._host_vectors[:3, :rows] = torch.tensor([tokens + pad_rows, positions + pad_rows, slots + pad_rows])
        self._host_lens[:bucket] = torch.tensor(lens + [1] * pad, dtype=torch.int32)
        if self._ragged:
            self._fill_ragged_rows(chunks, bucket)
        tables = [c.block_table for c in chunks] + [()] * pad
        changed = [i for i, table in enumerate(tables) if self._set_table_row(i, table)]
        if self._copied is not None:
            self._vectors.copy_(self._host_vectors, non_blocking=True)
            self._lens.copy_(self._host_lens, non_blocking=True)
            if changed:
                lo, hi = changed[0], changed[-1] + 1
                self._tables[lo:hi].copy_(self._host_tables[lo:hi], non_blocking=True)
            self._copied.record()

    def _one_token_rows(self, chunks: list[SequenceChunk]) -> tuple[list[int], list[int], list[int], list[int]]:
        """Tokens, positions, slots and context lengths of one-token chunks."""
        bs = self.block_size
        tokens, positions, slots = [], [], []
        for c in chunks:
            pos, table = c.start, c.block_table
            if not pos // bs < len(table) <= self.width:
                raise self._table_error(table, pos + 1)
            tokens.append(c.tokens[0])
            positions.append(pos)
            slots.append(slot_of(table, pos, bs))
        return tokens, positions, slots, [p + 1 for p in positions]

    def _padded_rows(self, chunks: list[SequenceChunk]) -> tuple[list[int], list[int], list[int], list[int]]:
        """The same for chunks of 1 to tokens_per_seq tokens, each padded to tokens_per_seq rows by
        pad rows (token 0 at the chunk's last position, into slot 0)."""
        bs, per_seq = self.block_size, self.tokens_per_seq
        tokens, positions, slots, lens = [], [], [], []
        for c in chunks:
            start, table = c.start, c.block_table
            end = start + len(c.tokens)
            if not (end - 1) // bs < len(table) <= self.width:
                raise self._table_error(table, end)
            pad = per_seq - len(c.tokens)
            tokens += c.tokens + (0,) * pad
            positions += [*range(start, end), *[end - 1] * pad]
            slots += [*[slot_of(table, p, bs) for p in range(start, end)], *[0] * pad]
            lens.append(end)
        return tokens, positions, slots, lens

    def _fill_ragged_rows(self, chunks: list[SequenceChunk], bucket: int) -> None:
        """Each sequence's logits row (its last real token; a pad sequence's first row) and, for
        every row, the packed hidden row it reads (a pad row repeats its chunk's last; a pad
        sequence reads row 0, whatever it holds)."""
        per_seq = self.tokens_per_seq
        logits_rows, hidden_rows = [], []
        packed = 0
        for i, c in enumerate(chunks):
            n = len(c.tokens)
            logits_rows.append(i * per_seq + n - 1)
            hidden_rows += [*range(packed, packed + n), *[packed + n - 1] * (per_seq - n)]
            packed += n
        logits_rows += range(len(chunks) * per_seq, bucket * per_seq, per_seq)
        hidden_rows += [0] * ((bucket - len(chunks)) * per_seq)
        self._host_vectors[3, :bucket] = torch.tensor(logits_rows)
        self._host_vectors[4, :bucket * per_seq] = torch.tensor(hidden_rows)

    def _table_error(self, table: tuple[int, ...], tokens: int) -> ValueError:
        return ValueError(f"block table of {len(table)} blocks cannot hold {tokens} tokens within {self.width} blocks")

    def _set_table_row(self, i: int, table: tuple[int, ...]) -> bool:
        """Makes host row i hold `table` (zeros after it); returns whether it changed."""
        old = self._table_rows[i]
        if old == table:
            return False
        if len(table) >= len(old) and table[:len(old)] == old:  # the sequence grew by new blocks
            self._host_tables[i, len(old):len(table)] = torch.tensor(table[len(old):], dtype=torch.int32)
        else:
            self._host_tables[i, :len(old)] = 0
            self._host_tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
        self._table_rows[i] = table
        return True
