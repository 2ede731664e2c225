"""CUDA graphs for speculative decoding (runtime/decode_graphs.py's multi-token shapes), on the tiny
target with its EAGLE-3 head (conftest's tiny_eagle_artifact, 3 draft steps):
- the verify step (every sequence feeds its last token and K drafts, a logits row each) and the
  draft program's calls (the first reads 1 to K + 1 tokens of each sequence, padded to K + 1
  rows; the later ones one token each, with the hidden rows the call before left) give, padded
  to a bucket, the rows of the same calls unpadded: on CPU without graphs, and on a GPU as graph
  replays, which must also equal the eager calls on the same padded buffers bit for bit;
- on a GPU, the engine serving through the captured graphs gives the greedy tokens it gives
  without graphs and without speculation.
The engine on CPU with the padded path is in tests/test_speculative.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_draft, step_outputs
from llama_aot.runtime.artifact import load_artifact
from llama_aot.runtime.decode_graphs import DecodeGraphs, batch_buckets

from test_decode_graphs import PROMPT_LENS, STEPS, Batch

STEPS_BOTH_WAYS = STEPS + STEPS[::-1]


def graphs_for(program, cache, build, **shape) -> DecodeGraphs:
    return DecodeGraphs(program, cache, batch_buckets(build.max_num_seqs), build.block_size, build.context_length,
                        **shape)


def check_rows(got, same_inputs, unpadded, tol, what):
    """`got` (a padded call's outputs) against the same call on the same padded buffers without a
    graph (identical, when given) and against the unpadded call (to rounding)."""
    for name, g, s, u in zip(("logits", "hidden"), got, same_inputs or got, unpadded):
        assert g.shape == u.shape, f"{what} {name}: {tuple(g.shape)} against {tuple(u.shape)}"
        assert torch.equal(g, s), f"{what} {name}: max diff {(g - s).abs().max()} against the same padded inputs"
        torch.testing.assert_close(g, u, rtol=tol, atol=tol, msg=lambda m: f"{what} {name}: {m}")


def check_verify_steps(artifact, device: str, capture: bool, tol: float) -> None:
    """Verify steps of changing batches, each sequence then taking 1 to K + 1 of the tokens it fed
    (as acceptance does), so that the next step starts where the last one's drafts were rejected
    and a block boundary falls inside a step."""
    cfg, build = artifact.model_config, artifact.build_config
    k = build.speculative_num_steps
    graphed, padded, plain = (Batch(artifact.step, cfg, build, PROMPT_LENS, device=device) for _ in range(3))
    shape = dict(tokens_per_seq=k + 1, all_logits=True)
    graphs, same_inputs = (graphs_for(artifact.step, b.cache, build, **shape) for b in (graphed, padded))
    if capture:
        graphs.capture()
        assert graphs.captured == (1, 2, 4, 8)
    gen = torch.Generator().manual_seed(1)
    for rows in STEPS_BOTH_WAYS:
        drafts = torch.randint(0, cfg.vocab_size, (len(rows), k), generator=gen).tolist()

        def chunks(batch):
            return [SequenceChunk((batch.tokens[i][-1], *d), len(batch.tokens[i]) - 1,
                                  batch._table(i, len(batch.tokens[i]) + k), all_logits=True)
                    for i, d in zip(rows, drafts)]
        got = [t.clone() for t in graphs.run(chunks(graphed))]
        again = same_inputs.run(chunks(padded)) if capture else None
        with torch.inference_mode():
            unpadded = step_outputs(artifact.step, build_step_inputs(chunks(plain), build.block_size, device),
                                    plain.cache)
        check_rows(got, again, unpadded, tol, f"verify batch {len(rows)}")
        choices = got[0].argmax(-1).view(len(rows), k + 1).tolist()
        accepted = torch.randint(0, k + 1, (len(rows),), generator=gen).tolist()
        for batch in (graphed, padded, plain):  # one token stream, so the caches stay comparable
            for i, d, a, c in zip(rows, drafts, accepted, choices):
                batch.tokens[i] += d[:a] + [c[a]]
    for batch in (graphed, padded) if capture else (graphed,):
        torch.testing.assert_close(batch.cache[:, :, 1:], plain.cache[:, :, 1:], rtol=tol, atol=tol)


class DraftSide:
    """Sequences as the draft program sees them: a draft cache with disjoint block tables after
    the reserved block 0, the positions read so far, and prompts read in eagerly with random
    hidden rows."""

    def __init__(self, artifact, device: str, seed: int = 0):
        cfg, build = artifact.model_config, artifact.build_config
        self.program, self.block_size, self.device = artifact.programs["draft"], build.block_size, device
        layout = dataclasses.replace(KVCacheLayout.of(cfg, build), num_layers=1, dtype=build.dtype)
        per_seq = layout.blocks_for(build.context_length)
        self.cache = layout.allocate(1 + len(PROMPT_LENS) * per_seq, device)
        self.tables = [tuple(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(len(PROMPT_LENS))]
        gen = torch.Generator().manual_seed(seed)
        chunks = [SequenceChunk(tuple(torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()), 0,
                                self.table(i, n)) for i, n in enumerate(PROMPT_LENS)]
        hidden = torch.randn(sum(PROMPT_LENS), cfg.hidden_size, generator=gen).to(device)
        self.eager(chunks, hidden)
        self.read = list(PROMPT_LENS)

    def table(self, i: int, length: int) -> tuple[int, ...]:
        return self.tables[i][:-(-length // self.block_size)]

    def eager(self, chunks, hidden):
        """The unpadded call, with the hidden rows at each chunk's last token as the runner takes them."""
        inputs = build_step_inputs(chunks, self.block_size, self.device)
        with torch.inference_mode():
            logits, hidden = call_draft(self.program, inputs, hidden, self.cache)
        return logits, hidden[inputs["logits_index"]]


def check_draft_calls(artifact, device: str, capture: bool, tol: float) -> None:
    """As ModelRunner.draft calls the draft program after each verify step: a first call reading
    1 to K + 1 tokens per sequence (all K + 1 in the first step, one each in the second, mixed
    after), then K - 1 calls of one token each. Every path is given the same tokens and hidden
    rows (the unpadded call's), so each call is compared on its own."""
    cfg, build = artifact.model_config, artifact.build_config
    k = build.speculative_num_steps
    graphed, padded, plain = (DraftSide(artifact, device) for _ in range(3))
    hidden_input = (cfg.hidden_size, plain.cache.dtype)

    def graph_pair(**shape):
        pair = [graphs_for(side.program, side.cache, build, hidden_input=hidden_input, **shape)
                for side in (graphed, padded)]
        if capture:
            pair[0].capture()
        return pair
    first, first_eager = graph_pair(tokens_per_seq=k + 1)
    later, later_eager = graph_pair()
    calls = [(first, first_eager)] + [(later, later_eager)] * (k - 1)
    gen = torch.Generator().manual_seed(2)
    for step, rows in enumerate(STEPS_BOTH_WAYS):
        counts = [k + 1] * len(rows) if step == 0 else [1] * len(rows) if step == 1 else \
            torch.randint(1, k + 2, (len(rows),), generator=gen).tolist()
        tokens = [tuple(torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()) for n in counts]
        reads = [SequenceChunk(t, plain.read[i], plain.table(i, plain.read[i] + len(t) + k - 1))
                 for i, t in zip(rows, tokens)]
        chunks, hidden = reads, torch.randn(sum(counts), cfg.hidden_size, generator=gen).to(device)
        for j, (graphs, same_inputs) in enumerate(calls):
            got = [t.clone() for t in graphs.run(chunks, hidden)]
            again = same_inputs.run(chunks, hidden) if capture else None
            expected = plain.eager(chunks, hidden)
            check_rows(got, again, expected, tol, f"draft call {j} of batch {len(rows)}")
            drafted, hidden = expected[0].argmax(-1).tolist(), expected[1]
            chunks = [SequenceChunk((t,), c.start + len(c.tokens) + j, c.block_table) for c, t in zip(reads, drafted)]
        for i, n in zip(rows, counts):
            plain.read[i] += n
    for side in (graphed, padded) if capture else (graphed,):
        torch.testing.assert_close(side.cache[:, :, 1:], plain.cache[:, :, 1:], rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def artifact(tiny_eagle_artifact):
    return load_artifact(tiny_eagle_artifact)


def test_padded_verify_steps_give_the_unpadded_rows(artifact):
    """What this protects: each sequence's K + 1 rows at its own place in the bucket, pad
    sequences (token 0 at position 0 and their pad rows, into block 0) that no real row sees, and
    the hidden rows that become `last_hidden` in the order after_commit reads them. Held to 1e-5
    as the decode steps are (tests/test_decode_graphs.py says why not bit for bit)."""
    check_verify_steps(artifact, "cpu", capture=False, tol=1e-5)


def test_padded_draft_calls_give_the_unpadded_rows(artifact):
    """What this protects: a ragged first call's tokens at their rows, its pad rows (token 0 at
    the chunk's last position, into block 0, reading the chunk's last hidden row) changing no real
    row, the packed hidden rows spread to the padded rows, the logits and hidden rows taken at each
    chunk's last token, and the later calls' one-token layout with their hidden input."""
    check_draft_calls(artifact, "cpu", capture=False, tol=1e-5)


# ---- on a GPU ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_eagle_artifact(tiny_checkpoint, tiny_eagle_head, tmp_path_factory):
    from conftest import TINY_BUILD

    from llama_aot.artifacts.config import BuildConfig
    from llama_aot.compiler.build import build_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny-eagle3-cuda"
    build = BuildConfig(target="cuda", dtype="float32", speculative_algorithm="EAGLE3", speculative_num_steps=3,
                        **TINY_BUILD)
    build_artifact(tiny_checkpoint, build, out, draft_model=tiny_eagle_head)
    return out


@pytest.mark.gpu
def test_verify_graph_replays_match_eager(cuda_eagle_artifact):
    check_verify_steps(load_artifact(cuda_eagle_artifact, single_threaded=True), "cuda", capture=True, tol=1e-4)


@pytest.mark.gpu
def test_draft_graph_replays_match_eager(cuda_eagle_artifact):
    check_draft_calls(load_artifact(cuda_eagle_artifact, single_threaded=True), "cuda", capture=True, tol=1e-4)


@pytest.mark.gpu
def test_engine_speculates_through_graphs_as_it_decodes_without(cuda_eagle_artifact, monkeypatch):
    """Greedy tokens through the captured verify and draft graphs are those of the engine without
    graphs and of the engine without speculation; the graphs were replayed for all three shapes."""
    from test_speculative import PROMPTS, greedy, run

    replays = {}
    original = DecodeGraphs.run

    def counting(self, chunks, hidden=None):
        out = original(self, chunks, hidden)
        if out is not None and self._graphs:
            key = (self.tokens_per_seq, self.all_logits)
            replays[key] = replays.get(key, 0) + 1
        return out
    monkeypatch.setattr(DecodeGraphs, "run", counting)
    requests = {f"r{i}": (p, greedy()) for i, p in enumerate(PROMPTS)}
    outputs = {}
    for name, graphs, speculate in (("graphs", True, True), ("eager", False, True), ("plain", False, False)):
        artifact = load_artifact(cuda_eagle_artifact, single_threaded=graphs)
        collector, _ = run(artifact, requests, speculate=speculate, graph_bs=None if graphs else 0)
        outputs[name] = {rid: collector.tokens(rid) for rid in collector.outputs}
    assert outputs["graphs"] == outputs["eager"] == outputs["plain"]
    assert set(replays) == {(4, True), (4, False), (1, False)}, replays
