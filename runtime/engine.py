"""The serving loop: continuous batching over a loaded artifact, on a thread of its own.

Callers (the HTTP server's event loop, tests) never touch the scheduler, the cache or the model.
They `submit` a request with a sink, a callable the engine invokes from its thread with each
`RequestOutput`, and may `abort` it at any time; both only enqueue a command, so the event loop is
never blocked by a model step. The loop drains commands, schedules a step, runs the compiled
step through the model runner (runtime/model_runner.py, which owns programs, cache and graphs),
samples, and turns tokens into text with stop checks.

A step's text goes out while the next step runs. Once step N is sampled and committed, the loop
schedules and launches step N+1, and only then detokenizes N's tokens, checks stop strings and
calls the sinks, whose wake-ups set the HTTP thread to work; the device computes meanwhile instead
of idling through that CPU work.
Whatever a token alone decides (EOS, a stop token id, max_tokens, a full context) retires its
sequence before the next schedule, so no step runs past it. A stop string is found a step later:
its sequence may sit in step N+1, whose token for it is then dropped (commit skips finished
sequences), and an abort that arrives meanwhile likewise drops the outputs still pending.

With an EAGLE draft program in the artifact, requests speculate (runtime/speculative.py):
a decode verifies the drafts made for it and may commit several tokens at once, cut at the first
that ends the request.

A request with a constraint (structured output, runtime/structured_output.py) carries a grammar
matcher, advanced with each committed token. Its row's token mask is filled on the CPU after the
step is launched, while the device computes it, and applied by the sampler to that row alone; a
step without constrained requests does none of this.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llama_aot.runtime.block_manager import BlockManager
from llama_aot.runtime.detokenizer import IncrementalDetokenizer, StopChecker
from llama_aot.runtime.model_runner import ModelRunner, RunnerFailure, StepPlan
from llama_aot.runtime.sampling import Sampler, SamplingParams, make_generator
from llama_aot.runtime.scheduler import Scheduler, SchedulerConfig
from llama_aot.runtime.sequence import Sequence
from llama_aot.runtime.speculative import Speculator
from llama_aot.runtime.structured_output import RequestGrammar, StructuredOutputs

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05
LOG_EVERY_S = 10.0  # a busy engine logs its throughput (and accept length) this often, as SGLang's decode log


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: a text delta (possibly empty), the new token with
    its logprobs, and, on the last output, why it finished. `error` is set, with
    finish_reason "error", when the engine could not run the request."""

    request_id: str
    text: str
    token_id: int | None
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str | None = None


@dataclass
class _Request:
    seq: Sequence
    params: SamplingParams
    sink: Callable[[RequestOutput], None]
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    grammar: RequestGrammar | None = None  # with a constraint: where its output stands in the grammar
    emitted: int = 0  # tokens handed to the sink: what usage counts, as a step may commit more than are sent


@dataclass
class EngineStats:
    """Read by the metrics endpoint from another thread: the engine only replaces plain numbers."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0
    spec_verify_steps: int = 0
    spec_accepted_drafts: int = 0
    spec_accept_length: float = 0.0


@dataclass(frozen=True)
class _Pending:
    """A sampled token whose text and sink call wait for the next step's launch."""

    state: _Request
    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class _Commands:
    queue: "queue.SimpleQueue" = field(default_factory=queue.SimpleQueue)
    wake: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Continuous batching over a `ModelRunner`; `runner.warmup()` before `start()`."""

    def __init__(self, runner: ModelRunner, tokenizer):
        self.runner, self.runtime, self.tokenizer, self.device = runner, runner.runtime, tokenizer, runner.device
        runtime = self.runtime
        self.eos_token_ids = tuple(runner.model_config.eos_token_ids)
        self.blocks = BlockManager(runtime.num_blocks, runtime.block_size, runtime.enable_prefix_caching)
        lookahead = runner.num_speculative_steps
        self.speculator = Speculator(runner, self.blocks) if lookahead else None
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=min(runtime.max_num_seqs,
                                                                    runtime.max_num_tokens // (1 + lookahead)),
                                                   max_num_tokens=runtime.max_num_tokens,
                                                   max_model_len=runtime.context_length,
                                                   num_lookahead_slots=lookahead), self.blocks)
        self.sampler = Sampler()
        self.structured = StructuredOutputs(tokenizer, runner.model_config.vocab_size, self.eos_token_ids,
                                            self.scheduler.config.max_num_seqs, self.device)
        self._requests: dict[str, _Request] = {}
        self._pending: list[_Pending] = []
        self._commands = _Commands()
        self._stop = threading.Event()
        self._idle = threading.Event()  # clear while the loop runs, on whichever thread
        self._idle.set()
        self.stats = EngineStats(kv_blocks_total=runtime.num_blocks - 1)
        self._logged = (time.monotonic(), 0, 0, 0)  # when, tokens sent, verify steps, accepted drafts
        self._tokens_sent = 0

    # ---- called from any thread -------------------------------------------------------------
    def check_request(self, prompt_len: int, max_tokens: int | None) -> int:
        """Validates a request's length before it is queued and returns its token limit (prompt +
        new tokens); raises ValueError with a message fit for an HTTP 400."""
        context = self.runtime.context_length
        if prompt_len < 1:
            raise ValueError("the prompt is empty")
        if prompt_len >= context:
            raise ValueError(f"the prompt has {prompt_len} tokens but the context length is {context}; "
                             "shorten the prompt")
        if max_tokens is not None and prompt_len + max_tokens > context:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the "
                             f"context length {context}; lower max_tokens")
        return context if max_tokens is None else prompt_len + max_tokens

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               sink: Callable[[RequestOutput], None]) -> None:
        limit = self.check_request(len(prompt_token_ids), params.max_tokens)
        self._commands.queue.put(("add", request_id, list(prompt_token_ids), params, sink, limit))
        self._commands.wake.set()

    def abort(self, request_id: str) -> None:
        self._commands.queue.put(("abort", request_id))
        self._commands.wake.set()

    def start(self) -> "Engine":
        """The engine loop on a thread of its own."""
        self._idle.clear()
        threading.Thread(target=self._run_loop, name="llama-aot-engine", daemon=True).start()
        return self

    def run(self) -> None:
        """The engine loop on the calling thread, until `shutdown()` from another: llama-serve runs
        it on the main thread (serve/cli.py says why)."""
        self._idle.clear()
        self._run_loop()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops after the step in flight; requests still running get finish_reason "abort"."""
        self._stop.set()
        self._commands.wake.set()
        self._idle.wait(timeout)

    # ---- engine thread -----------------------------------------------------------------------
    def _run_loop(self) -> None:
        try:
            self._loop()
        finally:
            self._idle.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_commands()
            try:
                if not self.scheduler.has_work():
                    self._emit_pending()
                    self._update_stats()
                    self._commands.wake.wait(IDLE_WAIT_S)
                    self._commands.wake.clear()
                    continue
                self._step()
                self._log_progress()
            except Exception as e:  # a bug or a device fault: fail the batch, keep serving
                if not isinstance(e, RunnerFailure):
                    log.exception("engine step failed")
                self._pending.clear()
                for request_id in list(self._requests):
                    self._fail(request_id, f"internal error: {type(e).__name__}: {e}")
            self._update_stats()
        self._emit_pending()
        for request_id in list(self._requests):
            self._finish_request(self._requests[request_id], "", "abort")

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.queue.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._add(*command[1:])
            elif command[1] in self._requests:
                self.scheduler.abort(command[1])
                state = self._requests.pop(command[1])
                if self.speculator is not None:
                    self.speculator.forget(state.seq.seq_id)

    def _add(self, request_id, prompt, params: SamplingParams, sink, limit) -> None:
        seq = Sequence(request_id, prompt, limit)
        # A constrained request's EOS always ends it: its mask allows EOS only where the grammar
        # does, and with ignore_eos only where nothing else may follow.
        ignore_eos = params.ignore_eos and params.constraint is None
        state = _Request(seq=seq, params=params, sink=sink, generator=make_generator(params.seed, self.device),
                         detokenizer=IncrementalDetokenizer(self.tokenizer, prompt),
                         stop=StopChecker(params.stop, params.stop_token_ids, self.eos_token_ids,
                                          ignore_eos, params.max_tokens))
        try:
            if params.constraint is not None:
                state.grammar = RequestGrammar(params.constraint)
            self.scheduler.add(seq)
        except ValueError as e:
            sink(self._output(state, "", None, None, None, "error", error=str(e)))
            return
        self._requests[request_id] = state

    def _step(self) -> None:
        step = self.scheduler.schedule()
        if not step.items:
            self._emit_pending()
            return
        items = step.sampled_items()
        # Taken before emitting: a request that a stop string ends there still has its row here.
        states = [self._requests[item.seq.request_id] for item in items]
        speculative = None
        if self.speculator is not None:
            params = {item.seq.seq_id: self._requests[item.seq.request_id].params for item in step.items}
            speculative = self.speculator.plan(step, params)
        plan = speculative.plan if speculative else StepPlan(tuple(step.chunks()), tuple(step.sample_rows))
        logits = self.runner.execute(plan)
        # The items sampled one token, as usual (the others verify drafts); constrained ones never speculate.
        plain = [i for i in range(len(items)) if not (speculative and speculative.drafts[i])]
        mask = self._token_mask([states[i] for i in plain])  # on the CPU while the device runs the step
        self._emit_pending()  # the previous step's text, while the device runs this one
        if not items:  # only mid-prompt chunks: nothing to sample yet
            self.scheduler.commit(step, {})
            if speculative:
                self.speculator.after_commit(speculative, {})
            return
        verified = [None] * len(items)
        if speculative:
            verified = self.speculator.accept(speculative, logits, [s.params for s in states],
                                              [s.generator for s in states])
            logits = logits[[rows.start for rows in speculative.rows]]
        logprobs = {}
        if plain:
            ps = [states[i] for i in plain]
            sampled = self.sampler.sample(logits if len(plain) == len(items) else logits[plain],
                                          [s.params for s in ps], [s.generator for s in ps],
                                          [s.seq.prompt_token_ids for s in ps], [s.seq.output_token_ids for s in ps],
                                          mask)
            for j, i in enumerate(plain):
                verified[i] = [sampled.token_ids[j]]
                logprobs[i] = (sampled.logprobs[j], sampled.top_logprobs[j])
        tokens = {item.seq.seq_id: self._cut(states[i], verified[i]) for i, item in enumerate(items)}
        by_seq = {item.seq.seq_id: i for i, item in enumerate(items)}
        strayed = []
        for seq in self.scheduler.commit(step, tokens):
            i, new = by_seq[seq.seq_id], tokens[seq.seq_id]
            if states[i].grammar is not None and not all(states[i].grammar.accept(t) for t in new):
                strayed.append(states[i])
                continue
            if states[i].stop.ends_with(new[-1]) or seq.reached_max_tokens:
                self.scheduler.finish(seq)  # its text and finish reason follow with the others
            logprob, top = logprobs.get(i, (None, None))  # a request that wants logprobs never speculates
            for token in new:
                self._pending.append(_Pending(states[i], token, logprob, top))
        if speculative:
            self.speculator.after_commit(speculative, tokens)
        for state in strayed:  # the mask allowed a token its grammar then refused: a bug, not the client's
            log.error("request %s: token %s left its grammar", state.seq.request_id, state.seq.output_token_ids[-1])
            self._fail(state.seq.request_id, "internal error: the output left its grammar")

    def _token_mask(self, states: list[_Request]):
        """The constrained requests' token masks for these sampled rows, or None when there are none."""
        rows = [j for j, s in enumerate(states) if s.grammar is not None]
        if not rows:
            return None
        return self.structured.masks([states[j].grammar for j in rows], rows,
                                     [states[j].params.ignore_eos for j in rows])

    @staticmethod
    def _cut(state: _Request, new: list[int]) -> list[int]:
        """Verified tokens up to the first that ends the request (EOS, a stop token) or its limit."""
        new = new[:state.seq.max_total_tokens - state.seq.num_tokens]
        end = next((j for j, token in enumerate(new) if state.stop.ends_with(token)), len(new) - 1)
        return new[:end + 1]

    def _emit_pending(self) -> None:
        """Emits the outputs held back from the last step, skipping requests aborted since."""
        pending, self._pending = self._pending, []
        for p in pending:
            if self._requests.get(p.state.seq.request_id) is p.state:
                self._emit(p.state, p.token, p.logprob, p.top)

    def _log_progress(self) -> None:
        """Every LOG_EVERY_S of serving, one line: requests, tokens per second, cache use, and with a
        draft program the accept length over those seconds."""
        now = time.monotonic()
        when, sent, verify, accepted = self._logged
        if now - when < LOG_EVERY_S:
            return
        stats = self.speculator.stats if self.speculator else None
        line = (f"{self.scheduler.num_running} running, {self.scheduler.num_waiting} waiting, "
                f"{(self._tokens_sent - sent) / (now - when):.1f} tokens/s, KV cache {self.blocks.usage:.0%}")
        if stats is not None and stats.verify_steps > verify:
            line += f", accept length {1 + (stats.accepted_drafts - accepted) / (stats.verify_steps - verify):.2f}"
        log.info(line)
        self._logged = (now, self._tokens_sent, stats.verify_steps if stats else 0, stats.accepted_drafts if stats else 0)

    def _emit(self, state: _Request, token: int, logprob, top) -> None:
        self._tokens_sent += 1
        state.emitted += 1
        delta = state.detokenizer.add(token)
        text, reason = state.stop.check(token, delta)
        if reason is None and state.seq.num_prompt_tokens + state.emitted >= state.seq.max_total_tokens:
            flushed, reason = state.stop.finish("length")
            text += flushed
        if reason is None:
            state.sink(self._output(state, text, token, logprob, top, None))
        else:
            self._finish_request(state, text, reason, token, logprob, top)

    def _finish_request(self, state: _Request, text: str, reason: str, token=None, logprob=None, top=None):
        self.scheduler.finish(state.seq)
        if self.speculator is not None:
            self.speculator.forget(state.seq.seq_id)
        self._requests.pop(state.seq.request_id, None)
        state.sink(self._output(state, text, token, logprob, top, reason))

    def _fail(self, request_id: str, message: str) -> None:
        state = self._requests.pop(request_id)
        self.scheduler.abort(request_id)
        if self.speculator is not None:
            self.speculator.forget(state.seq.seq_id)
        state.sink(self._output(state, "", None, None, None, "error", error=message))

    def _output(self, state: _Request, text, token, logprob, top, reason, error=None) -> RequestOutput:
        seq = state.seq
        return RequestOutput(request_id=seq.request_id, text=text, token_id=token, logprob=logprob,
                             top_logprobs=top, finish_reason=reason, prompt_tokens=len(seq.prompt_token_ids),
                             completion_tokens=state.emitted, cached_tokens=seq.num_cached_tokens,
                             error=error)

    def _update_stats(self) -> None:
        s, b = self.stats, self.blocks
        s.running, s.waiting = self.scheduler.num_running, self.scheduler.num_waiting
        s.kv_blocks_used, s.kv_usage = b.num_used_blocks, b.usage
        s.prefix_cache_hit_rate, s.prefix_cache_queries, s.prefix_cache_hits = (
            b.prefix_hit_rate, b.prefix_queries, b.prefix_hits)
        s.preemptions = self.scheduler.num_preemptions
        if self.speculator is not None:
            s.spec_verify_steps = self.speculator.stats.verify_steps
            s.spec_accepted_drafts = self.speculator.stats.accepted_drafts
            s.spec_accept_length = self.speculator.stats.mean_accept_length
