"""The serving engine driven directly, on the tiny Llama 3.1 CPU artifact: concurrent requests
against a one-request-at-a-time greedy reference, and the ways a request ends (max_tokens, a stop
token, a stop string, an abort) while the others go on. The engine emits a step's outputs while
the next step runs, so a request a stop string ends may already sit in that next step; these
tests check that nothing of it leaks out and that every KV block comes back."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer

from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.runtime.artifact import load_artifact
from llama_aot.runtime.config import RuntimeConfig
from llama_aot.runtime.engine import Engine
from llama_aot.runtime.model_runner import ModelRunner
from llama_aot.runtime.sampling import SamplingParams

from generation import greedy_generate

PROMPTS = [[128000, 791, 6864, 315, 9822, 374], [128000, 40, 1093], [128000, 3923, 374, 279, 1888, 315, 1521, 14],
           [128000, 9906, 11, 1917], [128000, 16, 11, 220, 17, 11, 220, 18]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def artifact(llama31_artifact):
    return load_artifact(llama31_artifact)


@pytest.fixture(scope="module")
def tokenizer(llama31_artifact):
    return Tokenizer.from_file(str(llama31_artifact / "tokenizer.json"))


@pytest.fixture(scope="module")
def reference(artifact):
    """Each prompt's greedy continuation, generated alone outside the engine."""
    layout = KVCacheLayout.of(artifact.model_config, artifact.build_config)
    return [greedy_generate(artifact.step, layout, [p], NEW_TOKENS)[0] for p in PROMPTS]


@pytest.fixture
def engine(artifact, tokenizer):
    runtime = RuntimeConfig(kv_cache_blocks=64).resolve(artifact.model_config, artifact.build_config,
                                                        artifact.weight_bytes)
    engine = Engine(ModelRunner(artifact, runtime), tokenizer).start()
    yield engine
    engine.shutdown()


class Collector:
    """Gathers each request's outputs; `wait` returns once the given requests have finished."""

    def __init__(self):
        self.outputs: dict[str, list] = {}
        self._finished: dict[str, threading.Event] = {}

    def sink(self, request_id: str):
        self.outputs[request_id] = []
        self._finished[request_id] = threading.Event()

        def receive(out):
            self.outputs[request_id].append(out)
            if out.finish_reason is not None:
                self._finished[request_id].set()
        return receive

    def wait(self, request_ids, timeout=60.0):
        for rid in request_ids:
            assert self._finished[rid].wait(timeout), f"{rid} did not finish"

    def tokens(self, request_id):
        return [o.token_id for o in self.outputs[request_id] if o.token_id is not None]

    def text(self, request_id):
        return "".join(o.text for o in self.outputs[request_id])

    def last(self, request_id):
        return self.outputs[request_id][-1]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, **kw)


def submit_all(engine, collector, params_by_index):
    for i, params in params_by_index.items():
        engine.submit(f"r{i}", PROMPTS[i], params, collector.sink(f"r{i}"))
    collector.wait([f"r{i}" for i in params_by_index])


def wait_for_free_blocks(engine, timeout=10.0):
    """The engine frees an aborted request's blocks when it next drains its commands."""
    deadline = time.monotonic() + timeout
    while engine.blocks.num_used_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.blocks.num_used_blocks == 0


def test_concurrent_requests_of_different_lengths_match_the_reference(engine, reference, tokenizer):
    """Requests that end at different steps, each by max_tokens: every one gets exactly the
    greedy tokens it gets alone, its text is their decoding, and all blocks come back."""
    collector = Collector()
    submit_all(engine, collector, {i: greedy(max_tokens=4 + 2 * i) for i in range(len(PROMPTS))})
    for i in range(len(PROMPTS)):
        rid, n = f"r{i}", 4 + 2 * i
        assert collector.tokens(rid) == reference[i][:n]
        assert collector.text(rid) == tokenizer.decode(reference[i][:n])
        last = collector.last(rid)
        assert (last.finish_reason, last.completion_tokens) == ("length", n)
        assert sum(o.finish_reason is not None for o in collector.outputs[rid]) == 1
    wait_for_free_blocks(engine)


def test_stop_token_ends_its_request_at_that_token(engine, reference):
    """A stop token id ends the request with "stop" at its first occurrence, without its text,
    while a longer request beside it runs on undisturbed."""
    stop_at = 3
    token = reference[0][stop_at]
    first = reference[0].index(token)
    collector = Collector()
    submit_all(engine, collector, {0: greedy(max_tokens=NEW_TOKENS, stop_token_ids=(token,)),
                                   1: greedy(max_tokens=NEW_TOKENS)})
    assert collector.tokens("r0") == reference[0][:first + 1]
    assert (collector.last("r0").finish_reason, collector.last("r0").completion_tokens) == ("stop", first + 1)
    assert collector.tokens("r1") == reference[1]
    wait_for_free_blocks(engine)


def test_stop_string_cuts_the_text_and_nothing_follows(engine, reference, tokenizer):
    """A stop string is found only once its tokens are detokenized, a step after they were
    sampled, when the request may already be in the next step: the output ends right before the
    string, with "stop", and no token of that next step reaches the client."""
    full = tokenizer.decode(reference[2])
    start = len(tokenizer.decode(reference[2][:4]))
    stop = full[start:start + 2]
    assert stop.strip(), f"pick another stop string than {stop!r}"
    collector = Collector()
    submit_all(engine, collector, {2: greedy(max_tokens=NEW_TOKENS, stop=(stop,)),
                                   3: greedy(max_tokens=NEW_TOKENS)})
    assert collector.text("r2") == full[:full.index(stop)]
    last = collector.last("r2")
    assert last.finish_reason == "stop"
    tokens = collector.tokens("r2")
    assert tokens == reference[2][:len(tokens)] and last.completion_tokens == len(tokens) < NEW_TOKENS
    assert collector.tokens("r3") == reference[3]
    wait_for_free_blocks(engine)


def test_abort_stops_the_outputs_and_spares_the_others(engine, reference):
    """A request aborted from its own sink after two tokens gets nothing more, not even the token
    its next step had already sampled; the others complete exactly, and its blocks come back."""
    collector = Collector()
    receive = collector.sink("r4")

    def abort_after_two(out):
        receive(out)
        if len(collector.outputs["r4"]) == 2:
            engine.abort("r4")

    engine.submit("r4", PROMPTS[4], greedy(max_tokens=NEW_TOKENS), abort_after_two)
    submit_all(engine, collector, {0: greedy(max_tokens=NEW_TOKENS), 1: greedy(max_tokens=NEW_TOKENS)})
    assert collector.tokens("r0") == reference[0] and collector.tokens("r1") == reference[1]
    wait_for_free_blocks(engine)
    got = collector.tokens("r4")
    assert got == reference[4][:2]
    assert all(o.finish_reason is None for o in collector.outputs["r4"])


def test_constrained_requests_beside_free_ones(engine, reference, tokenizer):
    """Structured output in a continuous batch: requests held to a regex and to a JSON schema
    (sampled, with ignore_eos) run beside free greedy ones. The free ones get exactly their
    reference tokens; the constrained ones match their grammar and end with "stop" where it does."""
    from llama_aot.runtime import structured_output as so

    def constrained(fmt, **kw):
        return SamplingParams(constraint=engine.structured.compile(so.Constraint((fmt,))), **kw)

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"]}
    collector = Collector()
    submit_all(engine, collector, {0: greedy(max_tokens=NEW_TOKENS),
                                   1: constrained(so.Regex("(yes|no), [0-9]"), temperature=0),
                                   2: greedy(max_tokens=NEW_TOKENS),
                                   3: constrained(so.JsonSchema.of(schema, compact=True), temperature=1.0, seed=1,
                                                  ignore_eos=True, max_tokens=40)})
    assert collector.tokens("r0") == reference[0] and collector.tokens("r2") == reference[2]
    assert re.fullmatch("(yes|no), [0-9]", collector.text("r1")) and collector.last("r1").finish_reason == "stop"
    value = json.loads(collector.text("r3"))
    assert set(value) == {"ok", "n"} and collector.last("r3").finish_reason == "stop"
    wait_for_free_blocks(engine)
