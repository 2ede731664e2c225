"""Speculative decoding in the engine (runtime/speculative.py) on the tiny target with an EAGLE-3
head built in (conftest's tiny_eagle_artifact): greedy output is the target's own, token for token,
with a random head (almost every draft rejected) and with drafts that are always right (every
draft accepted, several tokens committed a step); a request still ends exactly where it must
(max_tokens, a stop token inside the accepted drafts, the end of the context) with its usage
counted right; rejection sampling keeps the target's distribution (chi-square); the accept
length reaches /metrics, the benchmark and the server's log; and llama-serve's
--speculative-num-steps overrides the build's 3 (0 serves the artifact plainly), or is refused."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from tokenizers import Tokenizer

from llama_aot.runtime.artifact import load_artifact
from llama_aot.runtime.config import RuntimeConfig
from llama_aot.runtime.decode_graphs import DecodeGraphs
from llama_aot.runtime.engine import Engine
from llama_aot.runtime.model_runner import ModelRunner
from llama_aot.runtime.sampling import Sampler, SamplingParams, token_probabilities
from llama_aot.runtime.speculative import verify_sampled

from test_engine import Collector

PROMPTS = [[(7 * i + j) % 500 + 1 for j in range(3 + i % 9)] for i in range(16)]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def artifact(tiny_eagle_artifact):
    return load_artifact(tiny_eagle_artifact)


def run(artifact, requests, speculate=True, drafts=None, graph_bs=None, steps=None):
    """Serves `requests` ({id: (prompt, params)}) at once; returns (collector, speculator stats).
    `speculate` False serves the artifact without speculation (0 draft steps), `steps` overrides
    the build's number of draft steps (llama-serve --speculative-num-steps).
    `drafts`: replaces the head's drafts by this function of (sequence tokens so far, steps).
    `graph_bs`: the runtime's cuda_graph_max_bs instead of the resolved one; on CPU, steps and
    draft calls of a graphed shape then run padded through the graphs' static buffers."""
    runtime = RuntimeConfig(kv_cache_blocks=128, speculative_num_steps=steps if speculate else 0).resolve(
        artifact.model_config, artifact.build_config, artifact.weight_bytes)
    if graph_bs is not None:
        runtime = dataclasses.replace(runtime, cuda_graph_max_bs=graph_bs)
    runner = ModelRunner(artifact, runtime)
    runner.warmup()  # captures the graphs on a GPU
    engine = Engine(runner, Tokenizer.from_file(str(artifact.path / "tokenizer.json")))
    if drafts is not None:
        by_seq = {}
        original = engine.speculator.after_commit

        def after_commit(sp, committed):
            original(sp, committed)
            for item in sp.step.items:
                if item.seq.seq_id in engine.speculator._drafts:
                    engine.speculator._drafts[item.seq.seq_id] = drafts(item.seq.token_ids, runner.num_speculative_steps)
            by_seq.update(committed)
        engine.speculator.after_commit = after_commit
    engine.start()
    collector = Collector()
    try:
        for rid, (prompt, params) in requests.items():
            engine.submit(rid, prompt, params, collector.sink(rid))
        collector.wait(list(requests))
    finally:
        engine.shutdown()
    return collector, engine.speculator.stats if engine.speculator else None


def greedy(**kw):
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def plain(artifact):
    collector, _ = run(artifact, {f"r{i}": (p, greedy()) for i, p in enumerate(PROMPTS)}, speculate=False)
    return {rid: collector.tokens(rid) for rid in collector.outputs}


def test_greedy_tokens_are_the_targets_with_a_head_that_drafts_badly(artifact, plain):
    collector, stats = run(artifact, {f"r{i}": (p, greedy()) for i, p in enumerate(PROMPTS)})
    assert {rid: collector.tokens(rid) for rid in collector.outputs} == plain
    assert stats.verify_steps > 0 and stats.verify_steps <= stats.drafted <= 3 * stats.verify_steps  # fewer near the limit


def right_drafts(plain):
    """Drafts that are the target's greedy continuation of each of PROMPTS, as `run` takes them."""
    continuation = {tuple(p): plain[f"r{i}"] for i, p in enumerate(PROMPTS)}

    def oracle(tokens, steps):
        for prompt, out in continuation.items():
            if tuple(tokens[:len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                return (out[done:done + steps] + [0] * steps)[:steps]
        raise AssertionError("unknown sequence")
    return oracle


def test_drafts_that_are_always_right_are_all_accepted(artifact, plain):
    collector, stats = run(artifact, {f"r{i}": (p, greedy()) for i, p in enumerate(PROMPTS)},
                           drafts=right_drafts(plain))
    assert {rid: collector.tokens(rid) for rid in collector.outputs} == plain
    assert stats.mean_accept_length > 3.0  # 4 at most: three drafts and the target's token
    for rid in collector.outputs:
        final = collector.outputs[rid][-1]
        assert final.finish_reason == "length" and final.completion_tokens == NEW_TOKENS


def test_greedy_tokens_are_the_targets_through_the_graph_buffers(artifact, plain, monkeypatch):
    """With CUDA graphs asked for (on CPU: the padded static-buffer path a GPU replays as graphs),
    verify steps and both kinds of draft call run padded to their buckets, and greedy tokens stay
    the target's: with the head's own drafts, and with drafts right for a number of steps that
    varies by sequence and step, so that verify steps accept 0 to 3 drafts and the first draft call
    reads 1 to 4 tokens per sequence in one step (tests/test_speculative_graphs.py checks the rows)."""
    shapes, ragged = {}, []
    original = DecodeGraphs.run

    def counting(self, chunks, hidden=None):
        out = original(self, chunks, hidden)
        if out is not None:
            key = (self.tokens_per_seq, self.all_logits)
            shapes[key] = shapes.get(key, 0) + 1
            ragged.append(len({len(c.tokens) for c in chunks}) > 1)
        return out
    monkeypatch.setattr(DecodeGraphs, "run", counting)
    requests = {f"r{i}": (p, greedy()) for i, p in enumerate(PROMPTS)}
    collector, _ = run(artifact, requests, graph_bs=8)
    assert {rid: collector.tokens(rid) for rid in collector.outputs} == plain
    assert set(shapes) == {(4, True), (4, False), (1, False)}, shapes  # verify, first draft call, later ones

    right, vocab = right_drafts(plain), artifact.model_config.vocab_size

    def partly_right(tokens, steps):
        good = len(tokens) % (steps + 1)
        return [t if j < good else (t + 1) % vocab for j, t in enumerate(right(tokens, steps))]
    ragged.clear()
    collector, stats = run(artifact, requests, drafts=partly_right, graph_bs=8)
    assert {rid: collector.tokens(rid) for rid in collector.outputs} == plain
    assert any(ragged) and 1.5 < stats.mean_accept_length < 3.5


def graph_shapes(monkeypatch) -> set:
    """Records the (program, tokens_per_seq, all_logits) of every step ("step") or draft call
    ("draft") run through DecodeGraphs."""
    shapes = set()
    original = DecodeGraphs.run

    def recording(self, chunks, hidden=None):
        out = original(self, chunks, hidden)
        if out is not None:
            shapes.add(("draft" if hidden is not None else "step", self.tokens_per_seq, self.all_logits))
        return out
    monkeypatch.setattr(DecodeGraphs, "run", recording)
    return shapes


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_the_number_of_draft_steps_is_a_runtime_setting(artifact, plain, monkeypatch, steps):
    """--speculative-num-steps K, below, at or above the build's 3: the verify steps feed K drafts
    (graphed as K + 1 tokens a sequence, as are the first draft calls) and the greedy tokens are
    those without speculation."""
    shapes = graph_shapes(monkeypatch)
    collector, stats = run(artifact, {f"r{i}": (p, greedy()) for i, p in enumerate(PROMPTS)}, steps=steps, graph_bs=8)
    assert {rid: collector.tokens(rid) for rid in collector.outputs} == plain
    assert 0 < stats.verify_steps <= stats.drafted <= steps * stats.verify_steps
    assert stats.drafted > (steps - 1) * stats.verify_steps  # K drafts a step, fewer only near the limit
    expected = {("step", steps + 1, True), ("draft", steps + 1, False)} | ({("draft", 1, False)} if steps > 1 else set())
    assert shapes - {("step", 1, False)} == expected, shapes  # plain decode steps only if all are near their limit


def test_requests_that_do_not_speculate_replay_the_plain_decode_graphs(artifact, plain, monkeypatch):
    """In a speculating runner, steps where no sequence feeds drafts (here every request wants
    logprobs, so none speculates) replay plain one-token decode graphs, with the target's tokens."""
    shapes = graph_shapes(monkeypatch)
    requests = {f"r{i}": (p, greedy(logprobs=True)) for i, p in enumerate(PROMPTS[:4])}
    collector, stats = run(artifact, requests, graph_bs=8)
    assert stats.verify_steps == 0 and shapes == {("step", 1, False)}, shapes
    assert {rid: collector.tokens(rid) for rid in collector.outputs} == {f"r{i}": plain[f"r{i}"] for i in range(4)}


def test_zero_draft_steps_serve_the_artifact_plainly(artifact, plain, monkeypatch):
    """K = 0: no draft program, cache or Speculator, and plain one-token decode graphs."""
    shapes = graph_shapes(monkeypatch)
    runtime = RuntimeConfig(kv_cache_blocks=128, speculative_num_steps=0).resolve(
        artifact.model_config, artifact.build_config, artifact.weight_bytes)
    runner = ModelRunner(artifact, dataclasses.replace(runtime, cuda_graph_max_bs=8))
    assert runner.draft_program is None and not hasattr(runner, "draft_cache")
    assert Engine(runner, Tokenizer.from_file(str(artifact.path / "tokenizer.json"))).speculator is None
    collector, stats = run(artifact, {f"r{i}": (p, greedy()) for i, p in enumerate(PROMPTS[:4])}, steps=0, graph_bs=8)
    assert stats is None and shapes == {("step", 1, False)}
    assert {rid: collector.tokens(rid) for rid in collector.outputs} == {f"r{i}": plain[f"r{i}"] for i in range(4)}


def test_the_draft_cache_shares_the_kv_budget(artifact, monkeypatch):
    """On a GPU the cache is sized from free memory: a speculating server's blocks each have a
    draft-cache block too (one layer, the model dtype), so it gets fewer blocks for the same
    memory, and the two caches together stay within it."""
    from llama_aot.artifacts.kv_layout import KVCacheLayout

    cfg, build = artifact.model_config, dataclasses.replace(artifact.build_config, target="cuda")
    target_block = KVCacheLayout.of(cfg, build).block_bytes
    draft_block = KVCacheLayout.draft_of(cfg, build).block_bytes
    assert draft_block * cfg.num_layers == target_block  # the model dtype in both: one layer of the target's
    total = 10 ** 6 * target_block
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (200 * target_block + int(total * 0.15), total))

    def blocks(steps):
        return RuntimeConfig(mem_fraction_static=0.85, speculative_num_steps=steps).resolve(cfg, build, 0).num_blocks

    assert blocks(0) == 200 and blocks(3) == 200 * target_block // (target_block + draft_block) < 200


@pytest.mark.parametrize("fixture, steps, needle", [
    ("tiny_artifact", "2", "--speculative-num-steps 2: the artifact has no draft program; build it with "
                           "llama-compile --speculative-algorithm EAGLE3"),
    ("tiny_eagle_artifact", "-1", "--speculative-num-steps -1: must be between 0 (no speculation) and 8"),
    ("tiny_eagle_artifact", "9", "--speculative-num-steps 9: must be between 0 (no speculation) and 8"),
    ("tiny_eagle_artifact", "two", "argument --speculative-num-steps: invalid int value"),
])
def test_serve_refuses_draft_steps_it_cannot_run_in_one_line(request, capsys, fixture, steps, needle):
    from llama_aot.bench.server_process import free_port
    from llama_aot.serve.cli import main

    path = request.getfixturevalue(fixture)
    capsys.readouterr()  # the fixture's build, if it ran now
    try:
        status = main([str(path), "--port", str(free_port()), "--speculative-num-steps", steps])
    except SystemExit as e:  # argparse's errors exit from inside parse_args
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_serve_drafts_the_steps_it_is_told(tiny_eagle_artifact, tiny_artifact):
    """llama-serve's engine drafts --speculative-num-steps tokens, the build's without the flag; 0
    is accepted from an artifact without a draft program (it has nothing to turn off)."""
    from llama_aot.bench.server_process import free_port
    from llama_aot.serve.cli import build_server, parse_args

    def engine(path, *flags):
        return build_server(parse_args([str(path), "--port", str(free_port()), *flags]))[1]

    assert engine(tiny_eagle_artifact).speculator.num_steps == 3
    assert engine(tiny_eagle_artifact, "--speculative-num-steps", "1").speculator.num_steps == 1
    assert engine(tiny_eagle_artifact, "--speculative-num-steps", "0").speculator is None
    assert engine(tiny_artifact, "--speculative-num-steps", "0").speculator is None


def test_a_stop_token_inside_accepted_drafts_ends_the_request_there(artifact, plain):
    expected = plain["r3"]
    stop = expected[9]
    cut = expected[:expected.index(stop) + 1]
    prompt = PROMPTS[3]

    def oracle(tokens, steps):
        done = len(tokens) - len(prompt)
        return (expected[done:done + steps] + [0] * steps)[:steps]
    collector, _ = run(artifact, {"stop": (prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                                                  stop_token_ids=[stop]))}, drafts=oracle)
    assert collector.tokens("stop") == cut
    final = collector.outputs["stop"][-1]
    assert final.finish_reason == "stop" and final.completion_tokens == len(cut)


def test_sampled_requests_speculate_beside_greedy_ones(artifact, plain):
    requests = {"greedy": (PROMPTS[0], greedy()),
                "sampled": (PROMPTS[1], SamplingParams(temperature=1.0, seed=3, max_tokens=NEW_TOKENS, ignore_eos=True))}
    collector, stats = run(artifact, requests)
    assert collector.tokens("greedy") == plain["r0"]
    assert len(collector.tokens("sampled")) == NEW_TOKENS and collector.outputs["sampled"][-1].completion_tokens == NEW_TOKENS
    assert stats.verify_steps > 0


def test_a_constrained_request_decodes_beside_speculating_ones(artifact, plain):
    """A request held to a grammar never speculates (its drafts would need a mask per position):
    it matches its regex and ends with "stop" while the greedy requests beside it keep their tokens."""
    from llama_aot.runtime import structured_output as so

    config = artifact.model_config
    outputs = so.StructuredOutputs(Tokenizer.from_file(str(artifact.path / "tokenizer.json")), config.vocab_size,
                                   tuple(config.eos_token_ids), max_rows=1)
    grammar = outputs.compile(so.Constraint((so.Regex("(yes|no)! [a-z]{3,6}"),)))
    sampled = SamplingParams(temperature=1.0, seed=2, max_tokens=NEW_TOKENS, constraint=grammar)
    requests = {"r0": (PROMPTS[0], greedy()), "r1": (PROMPTS[1], greedy()), "constrained": (PROMPTS[2], sampled)}
    collector, stats = run(artifact, requests)
    assert collector.tokens("r0") == plain["r0"] and collector.tokens("r1") == plain["r1"]
    assert re.fullmatch("(yes|no)! [a-z]{3,6}", collector.text("constrained"))
    assert collector.outputs["constrained"][-1].finish_reason == "stop" and stats.verify_steps > 0


def test_a_request_runs_to_the_end_of_the_context(artifact):
    """No draft or verify step may reach past the context (the programs' block tables end there)."""
    context = artifact.build_config.context_length
    prompt = [(5 * j) % 500 + 1 for j in range(context - 14)]
    requests = {"long": (prompt, SamplingParams(temperature=0, ignore_eos=True))}
    spec, stats = run(artifact, requests)
    reference, _ = run(artifact, requests, speculate=False)
    assert spec.tokens("long") == reference.tokens("long") and len(spec.tokens("long")) == 14
    assert spec.outputs["long"][-1].finish_reason == "length" and stats.verify_steps > 0


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of `counts` against `probs`, the tokens expected fewer than 5 times pooled."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed = torch.cat((counts[big].double(), counts[~big].sum()[None].double()))
    expected = torch.cat((expected[big].double(), expected[~big].sum()[None].double()))
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return 1 - torch.distributions.Chi2(torch.tensor(float(df))).cdf(statistic).item()


def test_rejection_sampling_draws_from_the_targets_distribution():
    """Draft tokens a likely and an unlikely token: the first token out is distributed as the
    target's p at that row, and the second, after the first draft was accepted, as the next row's
    (chi-square, 20,000 draws at temperature 0.8 with top_k 40; seeded, so the test is fixed)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 64, generator=gen) * 2
    params = SamplingParams(temperature=0.8, top_k=40)
    probs = token_probabilities(logits, [params] * 3)
    likely, unlikely = int(probs[0].argmax()), int(probs[1].argsort()[20])
    first, second = torch.zeros(64), torch.zeros(64)
    draws = torch.Generator().manual_seed(1)
    for _ in range(20_000):
        out = verify_sampled(probs, (likely, unlikely), draws)
        first[out[0]] += 1
        if out[0] == likely:
            second[out[1]] += 1
    assert chi_square_p_value(first, probs[0]) > 1e-3
    assert chi_square_p_value(second, probs[1]) > 1e-3
    assert first[likely] / 20_000 == pytest.approx(probs[0, likely].item(), abs=0.02)
    plain = torch.bincount(torch.cat([Sampler()._sample_random(logits[:1], [params], [draws]) for _ in range(5000)]),
                           minlength=64)
    assert chi_square_p_value(plain, probs[0]) > 1e-3  # the plain sampler draws from the same p


def test_the_served_accept_length_reaches_metrics_and_the_benchmark(tiny_eagle_artifact, capsys):
    """llama-serve on the EAGLE artifact counts its verify steps and accepted drafts in /metrics,
    and `llama-bench serve` prints the run's accept length as SGLang's bench_serving does."""
    from llama_aot.bench import cli

    from server import ServerProcess

    server = ServerProcess(tiny_eagle_artifact)
    try:
        code = cli.main(["serve", "--base-url", server.base_url, "--tokenizer", str(tiny_eagle_artifact),
                         "--dataset", "random", "--num-prompts", "6", "--random-input-len", "16",
                         "--random-output-len", "12", "--max-concurrency", "3"])
        metrics = server.metrics()
    finally:
        server.stop()
    out = capsys.readouterr().out
    assert code == 0, out
    assert metrics["llama_aot_spec_verify_steps_total"] > 0
    line = next(line for line in out.splitlines() if line.startswith("Accept length:"))
    assert 1.0 <= float(line.split()[-1]) <= 4.0


def test_a_busy_engine_logs_its_accept_length(artifact, plain, monkeypatch, caplog):
    from llama_aot.runtime import engine as engine_module

    monkeypatch.setattr(engine_module, "LOG_EVERY_S", 0.0)
    with caplog.at_level("INFO", logger="llama_aot.runtime.engine"):
        run(artifact, {"r0": (PROMPTS[0], greedy())})
    lines = [r.getMessage() for r in caplog.records if "tokens/s" in r.getMessage()]
    assert any("running" in line and "accept length" in line for line in lines), lines
