"""Decode steps padded to batch-size buckets: bucket choice, flags, and logits that padding must
not change (on CPU, without graphs), then graph replay against eager on a CUDA build."""
import dataclasses
import threading

import pytest
import torch

from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_step
from llama_aot.runtime.artifact import load_artifact
from llama_aot.runtime.config import RuntimeConfig, RuntimeConfigError
from llama_aot.runtime.decode_graphs import DecodeGraphs, batch_buckets

PROMPT_LENS = (3, 4, 7, 8, 1, 13, 2, 5)  # around block boundaries of the tiny build's 4-token blocks
# Which sequences each decode step runs: the batch grows and shrinks, and a buffer row holds a
# different sequence (a longer or shorter block table) from one step to the next.
STEPS = ([0, 1, 2, 3, 4, 5, 6, 7], [5, 1, 6], [2, 7, 0, 3, 4], [6], [1, 0, 5, 7, 2, 4], [3, 6],
         list(range(8)), [7, 6, 5, 4, 3, 2, 1], [4, 5, 0, 1])


class Batch:
    """Sequences decoded greedily in place of the engine: disjoint block tables after the
    reserved block 0, prompts prefilled in one step, then decode chunks for any subset."""

    def __init__(self, program, cfg, build, prompt_lens, device="cpu", seed=0):
        layout = KVCacheLayout.of(cfg, build)
        block_size = self.block_size = build.block_size
        self.per_seq = layout.blocks_for(build.context_length)
        self.cache = layout.allocate(1 + len(prompt_lens) * self.per_seq, device)
        gen = torch.Generator().manual_seed(seed)
        self.tokens = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in prompt_lens]
        self.tables = [tuple(range(1 + i * self.per_seq, 1 + (i + 1) * self.per_seq)) for i in range(len(prompt_lens))]
        chunks = [SequenceChunk(tuple(t), 0, self._table(i, len(t))) for i, t in enumerate(self.tokens)]
        self.advance(range(len(chunks)), eager(program, chunks, block_size, self.cache))

    def _table(self, i, length):
        return self.tables[i][:-(-length // self.block_size)]

    def decode_chunks(self, rows) -> list[SequenceChunk]:
        return [SequenceChunk((self.tokens[i][-1],), len(self.tokens[i]) - 1, self._table(i, len(self.tokens[i])))
                for i in rows]

    def advance(self, rows, logits):
        for i, row in zip(rows, logits):
            self.tokens[i].append(int(row.argmax()))


def eager(program, chunks, block_size, cache):
    inputs = build_step_inputs(chunks, block_size, cache.device)
    with torch.inference_mode():
        return call_step(program, inputs, cache)


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return load_artifact(tiny_artifact)


def test_buckets_follow_sglang_and_end_at_the_cap():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert len(batch_buckets(160)) == 23 and batch_buckets(160)[-2:] == (152, 160)
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_bucket_for_takes_the_smallest_that_fits_and_only_decode_steps():
    runner = DecodeGraphs(None, torch.zeros(1), (1, 2, 4, 8), block_size=4, context_length=16)
    decode = [SequenceChunk((5,), 3, (1,))] * 8
    assert [runner.bucket_for(decode[:n]) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert runner.bucket_for(decode + decode[:1]) is None  # beyond the largest bucket
    assert runner.bucket_for([]) is None
    assert runner.bucket_for(decode[:2] + [SequenceChunk((5, 6), 3, (1, 2))]) is None  # a prefill chunk
    assert runner.bucket_for([SequenceChunk((5,), 3, (1,), all_logits=True)]) is None
    assert runner.run([SequenceChunk((5, 6), 3, (1, 2))]) is None  # the caller runs it eagerly
    with pytest.raises(ValueError, match="block table of 1 blocks cannot hold 9 tokens"):
        runner.run([SequenceChunk((5,), 8, (1,))])
    with pytest.raises(ValueError, match="increasing"):
        DecodeGraphs(None, torch.zeros(1), (4, 2), block_size=4, context_length=16)


def test_bucket_for_multi_token_shapes():
    """A verify step's chunks have exactly tokens_per_seq tokens, each with a logits row; a ragged
    (draft) step's have 1 to tokens_per_seq tokens and one logits row."""
    verify = DecodeGraphs(None, torch.zeros(1), (1, 2, 4), block_size=4, context_length=16, tokens_per_seq=4,
                          all_logits=True)
    ragged = DecodeGraphs(None, torch.zeros(1), (1, 2, 4), block_size=4, context_length=16, tokens_per_seq=4)
    four, two = SequenceChunk((5, 6, 7, 8), 3, (1, 2)), SequenceChunk((5, 6), 3, (1, 2))
    assert verify.bucket_for([SequenceChunk(four.tokens, 3, (1, 2), all_logits=True)] * 3) == 4
    assert verify.bucket_for([SequenceChunk(four.tokens, 3, (1, 2), all_logits=True), two]) is None
    assert verify.bucket_for([SequenceChunk(two.tokens, 3, (1, 2), all_logits=True)]) is None  # fewer drafts
    assert verify.bucket_for([four]) is None  # one logits row: not a verify step
    assert ragged.bucket_for([four, two, SequenceChunk((5,), 3, (1,))]) == 4
    assert ragged.bucket_for([SequenceChunk((5,) * 5, 3, (1, 2))]) is None
    assert ragged.bucket_for([SequenceChunk(four.tokens, 3, (1, 2), all_logits=True)]) is None
    assert (verify.logits_rows_per_seq, ragged.logits_rows_per_seq) == (4, 1)
    with pytest.raises(ValueError, match="block table of 1 blocks cannot hold 5 tokens"):
        ragged.run([SequenceChunk((5, 6), 3, (1,))])
    with pytest.raises(ValueError, match="hidden rows go with the graphs of a draft program"):
        ragged.run([SequenceChunk((5,), 0, (1,))], torch.zeros(1, 8))
    draft = DecodeGraphs(None, torch.zeros(1), (1, 2), block_size=4, context_length=16, hidden_input=(8, torch.float32))
    with pytest.raises(ValueError, match="hidden of 1 rows for 2 tokens"):
        draft.run([SequenceChunk((5,), 0, (1,))] * 2, torch.zeros(1, 8))
    with pytest.raises(ValueError, match="hidden rows go with"):
        draft.run([SequenceChunk((5,), 0, (1,))])


def test_padded_decode_gives_the_unpadded_logits(artifact):
    """The same batch decodes side by side in two caches, eagerly and through the runner with
    buckets 1-2-4-8, the batch size and the sequence in each row changing between steps (so rows
    of earlier steps must be cleared or rewritten) and contexts crossing block boundaries.

    What this protects: the runner feeds the program the real chunks followed by pad chunks
    (token 0 at position 0 in reserved block 0), with each row's block table rewritten or cleared,
    and pad rows never touch a block a sequence owns. A wrong token, position, slot, context length
    or stale table row changes a row's logits by orders of magnitude more than float32 rounding
    (and, over these steps, the greedy tokens), so rows are held to 1e-5 of the eager step with
    explicit pads, and to the unpadded step likewise, not bit for bit: the same rows computed from
    other buffers, or among another number of rows, may take another GEMM path (on a CPU with
    AVX-512 and AMX, batch 5 differed by 4.4e-6). The greedy tokens and the block tables must match
    exactly."""
    cfg, build = artifact.model_config, artifact.build_config
    plain = Batch(artifact.step, cfg, build, PROMPT_LENS)
    padded = Batch(artifact.step, cfg, build, PROMPT_LENS)
    runner = DecodeGraphs(artifact.step, padded.cache, batch_buckets(build.max_num_seqs), build.block_size,
                          build.context_length)
    pad = SequenceChunk((0,), 0, (0,))
    for rows in STEPS:
        n, bucket = len(rows), runner.bucket_for(plain.decode_chunks(rows))
        unpadded = eager(artifact.step, plain.decode_chunks(rows), build.block_size, plain.cache.clone())
        expected = eager(artifact.step, plain.decode_chunks(rows) + [pad] * (bucket - n), build.block_size,
                         plain.cache)[:n]
        (got,) = runner.run(padded.decode_chunks(rows))
        tables = torch.zeros(bucket, runner.width, dtype=torch.int32)  # pad rows: all zeros
        for i, chunk in enumerate(padded.decode_chunks(rows)):
            tables[i, :len(chunk.block_table)] = torch.tensor(chunk.block_table)
        assert torch.equal(runner._tables[:bucket], tables)
        assert got.shape == unpadded.shape == (n, cfg.vocab_size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"batch {n}: {m}")
        torch.testing.assert_close(got, unpadded, rtol=1e-5, atol=1e-5, msg=lambda m: f"batch {n}: {m}")
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        plain.advance(rows, expected)
        padded.advance(rows, got)
    assert padded.tokens == plain.tokens
    torch.testing.assert_close(padded.cache[:, :, 1:], plain.cache[:, :, 1:], rtol=1e-5, atol=1e-5)


def gpu_build(build, **changes):
    """`build` as a CUDA build config would read, with `changes`, for resolving runtime flags on a
    machine without a GPU."""
    return dataclasses.replace(build, target="cuda", **changes)


def test_kv_cache_on_a_gpu_is_sized_from_the_memory_free_now(artifact, monkeypatch):
    """Memory another process holds (or our weights, loaded first) counts against the fraction; a
    GPU too full for one request is refused with the free memory in the message."""
    cfg, build = artifact.model_config, artifact.build_config
    on_gpu = gpu_build(build)
    block_bytes = RuntimeConfig(kv_cache_blocks=600).resolve(cfg, on_gpu, 0).block_bytes
    total = 1000 * block_bytes
    every_request_at_full_context = 1 + build.max_num_seqs * -(-build.context_length // build.block_size)
    assert every_request_at_full_context == 513
    for free, blocks in ((1000 * block_bytes, 513), (400 * block_bytes, 250)):  # 400 - 150 kept back
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda free=free: (free, total))
        assert RuntimeConfig(mem_fraction_static=0.85).resolve(cfg, on_gpu, 10 ** 9).num_blocks == blocks
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (100 * block_bytes, total))
    with pytest.raises(RuntimeConfigError, match=r"GiB of the GPU's .* GiB are free\); raise --mem-fraction-static"):
        RuntimeConfig(mem_fraction_static=0.85).resolve(cfg, on_gpu, 0)


def test_cuda_graph_flags_resolve_against_the_artifact(artifact):
    cfg, build = artifact.model_config, artifact.build_config
    on_gpu, big_gpu = gpu_build(build), gpu_build(build, max_num_seqs=256, max_num_tokens=512)

    def graph_bs(build, **flags):
        return RuntimeConfig(kv_cache_blocks=600, **flags).resolve(cfg, build, 0).cuda_graph_max_bs

    assert graph_bs(on_gpu) == build.max_num_seqs == 8
    assert graph_bs(on_gpu, max_num_seqs=6) == 6
    assert graph_bs(on_gpu, cuda_graph_max_bs=4) == 4
    assert graph_bs(big_gpu) == 160
    assert graph_bs(on_gpu, disable_cuda_graph=True) == 0
    assert graph_bs(build) == 0  # a CPU artifact decodes eagerly
    with pytest.raises(RuntimeConfigError, match="--cuda-graph-max-bs 9 exceeds --max-running-requests 8"):
        graph_bs(on_gpu, cuda_graph_max_bs=9)
    with pytest.raises(RuntimeConfigError, match="--cuda-graph-max-bs must not be negative"):
        RuntimeConfig(cuda_graph_max_bs=-1)


@pytest.mark.parametrize("flags, needle", [
    (["--cuda-graph-max-bs", "-1"], "--cuda-graph-max-bs must not be negative"),
    (["--cuda-graph-max-bs", "9"], "--cuda-graph-max-bs 9 exceeds --max-running-requests 8"),
    (["--cuda-graph-max-bs", "many"], "argument --cuda-graph-max-bs: invalid int value"),
    (["--kv-cache-blocks", str(10 ** 13)], "does not fit in the cpu's free memory; lower --kv-cache-blocks"),
])
def test_serve_refuses_bad_runtime_flags_in_one_line(capsys, tiny_artifact, flags, needle):
    from llama_aot.bench.server_process import free_port

    from llama_aot.serve.cli import main

    try:
        status = main([str(tiny_artifact), "--port", str(free_port()), *flags])
    except SystemExit as e:  # argparse's errors exit from inside parse_args
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and needle in err and len(err.strip().splitlines()) == 1, err


# ---- on a GPU ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_artifact(tiny_checkpoint, tmp_path_factory):
    from conftest import TINY_BUILD

    from llama_aot.artifacts.config import BuildConfig
    from llama_aot.compiler.build import build_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny-cuda"
    build_artifact(tiny_checkpoint, BuildConfig(target="cuda", dtype="float32", **TINY_BUILD), out)
    return out


@pytest.mark.gpu
def test_graph_replay_matches_eager(cuda_artifact):
    """Replays against eager calls of the same padded inputs (must be identical) and against the
    unpadded step (must agree to rounding), for batch sizes that change from step to step."""
    artifact = load_artifact(cuda_artifact, single_threaded=True)
    cfg, build = artifact.model_config, artifact.build_config
    graphed, padded, plain = (Batch(artifact.step, cfg, build, PROMPT_LENS, device="cuda") for _ in range(3))
    buckets = batch_buckets(build.max_num_seqs)
    graphs = DecodeGraphs(artifact.step, graphed.cache, buckets, build.block_size, build.context_length)
    eager_padded = DecodeGraphs(artifact.step, padded.cache, buckets, build.block_size, build.context_length)
    assert graphs.capture() > 0 and graphs.captured == buckets == (1, 2, 4, 8)
    for rows in STEPS + STEPS[::-1]:
        n = len(rows)
        got = graphs.run(graphed.decode_chunks(rows))[0].clone()
        (same_inputs,) = eager_padded.run(padded.decode_chunks(rows))
        unpadded = eager(artifact.step, plain.decode_chunks(rows), build.block_size, plain.cache)
        assert torch.equal(got, same_inputs), f"batch {n}: max diff {(got - same_inputs).abs().max()}"
        torch.testing.assert_close(got, unpadded, rtol=1e-4, atol=1e-4)
        for batch in (graphed, padded, plain):
            batch.advance(rows, got)  # one token stream, so the three caches stay comparable
    assert torch.equal(graphed.cache[:, :, 1:], padded.cache[:, :, 1:])


@pytest.mark.gpu
def test_engine_decodes_through_graphs_as_it_does_eagerly(cuda_artifact):
    """The engine with graphs captured at warm-up generates the same greedy tokens as the engine
    with graphs disabled, for concurrent requests of different lengths."""
    from tokenizers import Tokenizer

    from llama_aot.runtime.engine import Engine
    from llama_aot.runtime.model_runner import ModelRunner
    from llama_aot.runtime.sampling import SamplingParams

    tokenizer = Tokenizer.from_file(str(cuda_artifact / "tokenizer.json"))
    prompts = [list(range(10, 10 + n)) for n in PROMPT_LENS]
    outputs = {}
    for disable in (False, True):
        artifact = load_artifact(cuda_artifact, single_threaded=not disable)
        runtime = RuntimeConfig(kv_cache_blocks=200, disable_cuda_graph=disable).resolve(
            artifact.model_config, artifact.build_config, artifact.weight_bytes)
        runner = ModelRunner(artifact, runtime)
        engine = Engine(runner, tokenizer)
        warmup = runner.warmup()
        assert warmup.graph_batch_sizes == (() if disable else (1, 2, 4, 8))
        assert warmup.graph_count == len(warmup.graph_batch_sizes)
        assert (warmup.capture_s > 0) != disable
        tokens = {i: [] for i in range(len(prompts))}
        done = threading.Semaphore(0)

        def sink(out, i):
            if out.token_id is not None:
                tokens[i].append(out.token_id)
            if out.finish_reason is not None:
                assert out.error is None, out.error
                done.release()

        engine.start()
        try:
            for i, prompt in enumerate(prompts):
                params = SamplingParams(temperature=0, max_tokens=6 + 2 * i, ignore_eos=True)
                engine.submit(f"r{i}", prompt, params, lambda out, i=i: sink(out, i))
            for _ in prompts:
                assert done.acquire(timeout=120)
        finally:
            engine.shutdown()
        outputs[disable] = tokens
    assert outputs[False] == outputs[True]
    assert all(len(t) == 6 + 2 * i for i, t in outputs[False].items())
