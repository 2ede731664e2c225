"""Prometheus metrics, in the text exposition format, with no dependency.

Latencies are measured here, where the client's response is produced: TTFT from the request's
arrival to its first token, ITL between tokens, end-to-end to the last. Gauges (KV blocks, prefix
cache, queue) are read from the engine's stats at scrape time.
"""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

from llama_aot.runtime.engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets + (float("inf"),), self.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {cumulative}"]
        return lines


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)   # finish_reason -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_tokens = 0
        self.ttft = Histogram("llama_aot_time_to_first_token_seconds", "Time from request arrival to its first token.")
        self.itl = Histogram("llama_aot_inter_token_latency_seconds", "Time between consecutive output tokens.")
        self.e2e = Histogram("llama_aot_e2e_request_latency_seconds", "Time from request arrival to its last token.")

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                 seconds: float) -> None:
        with self._lock:
            self.requests[reason] += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += completion_tokens
            self.cached_tokens += cached_tokens
            self.e2e.observe(seconds)

    def render(self, stats: EngineStats) -> str:
        def metric(name, kind, help_text, samples):
            out = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            out += [f"{name}{labels} {value}" for labels, value in samples]
            return out

        with self._lock:
            lines = metric("llama_aot_requests_total", "counter", "Finished requests by finish reason.",
                           [(f'{{finish_reason="{r}"}}', n) for r, n in sorted(self.requests.items())] or [("", 0)])
            lines += metric("llama_aot_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                            [("", self.prompt_tokens)])
            lines += metric("llama_aot_generation_tokens_total", "counter", "Generated tokens of finished requests.",
                            [("", self.generation_tokens)])
            lines += metric("llama_aot_cached_prompt_tokens_total", "counter",
                            "Prompt tokens served from the prefix cache.", [("", self.cached_tokens)])
            for h in (self.ttft, self.itl, self.e2e):
                lines += h.render()
        lines += metric("llama_aot_kv_blocks_used", "gauge", "KV-cache blocks referenced by requests.",
                        [("", stats.kv_blocks_used)])
        lines += metric("llama_aot_kv_blocks_total", "gauge", "KV-cache blocks available to requests.",
                        [("", stats.kv_blocks_total)])
        lines += metric("llama_aot_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use.",
                        [("", stats.kv_usage)])
        lines += metric("llama_aot_prefix_cache_hit_rate", "gauge", "Prompt tokens found in the prefix cache / looked up.",
                        [("", stats.prefix_cache_hit_rate)])
        lines += metric("llama_aot_queue_depth", "gauge", "Requests waiting to be scheduled.", [("", stats.waiting)])
        lines += metric("llama_aot_running_requests", "gauge", "Requests being decoded.", [("", stats.running)])
        lines += metric("llama_aot_preemptions_total", "counter", "Requests preempted for lack of KV blocks.",
                        [("", stats.preemptions)])
        lines += metric("llama_aot_spec_verify_steps_total", "counter",
                        "Decode steps that verified EAGLE drafts (0 without a draft program).",
                        [("", stats.spec_verify_steps)])
        lines += metric("llama_aot_spec_accepted_drafts_total", "counter", "EAGLE drafts the target accepted.",
                        [("", stats.spec_accepted_drafts)])
        lines += metric("llama_aot_spec_accept_length", "gauge",
                        "Mean tokens a verify step yields: accepted drafts plus the target's own (SGLang's accept length).",
                        [("", stats.spec_accept_length)])
        return "\n".join(lines) + "\n"
