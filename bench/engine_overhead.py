"""The serving engine's own CPU time per step, without a model: scheduling, step inputs, sampling,
commit, detokenizing, stop checks and sinks.

    python -m llama_aot.bench.engine_overhead [--batch 1,16,64,128] [--tokens 200]

Runs the real Engine over a stand-in program that returns ready-made logits at once, so every
second of a step is engine Python. `--batch` requests with 200-token prompts decode `--tokens`
tokens each, together. On the GPU the device runs the step in the meantime; what is not hidden
behind it (everything but the emission, which overlaps the next step) adds to every token's
latency. Runs anywhere; the tokenizer is a byte-level stand-in.
"""
from __future__ import annotations

import argparse
import threading
import time

import torch

VOCAB = 256  # logits this narrow keep the stand-in's argmax negligible next to the engine's work


def stand_in_tokenizer():
    """An empty byte-level BPE: enough for the engine's detokenizer and the app, with no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    return tokenizer


class _StandInRunner:
    """What Engine reads from a model runner, with steps that cost nothing: each returns one row per
    sampled sequence, peaked on a token that changes every step."""

    def __init__(self, runtime):
        from llama_aot.artifacts.config import ModelConfig

        self.runtime, self.device, self.num_speculative_steps = runtime, "cpu", 0
        self.model_config = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=1,
                                        num_heads=2, num_kv_heads=1, head_dim=32, rms_norm_eps=1e-5,
                                        rope_theta=1e4, max_position_embeddings=1 << 14, tie_word_embeddings=True)
        self.calls = 0

    def execute(self, plan):
        self.calls += 1
        logits = torch.zeros(len(plan.sample_rows) or len(plan.chunks), VOCAB)
        logits[:, 97 + self.calls % 26] = 1.0
        return logits


def measure(batch: int, tokens: int, prompt_len: int = 200) -> tuple[float, float]:
    """Seconds of engine time per step with `batch` requests decoding together, and the part of it
    spent emitting outputs (the part a GPU step overlaps)."""
    from llama_aot.runtime.config import ResolvedRuntime
    from llama_aot.runtime.engine import Engine
    from llama_aot.runtime.sampling import SamplingParams

    tokenizer = stand_in_tokenizer()
    blocks = -(-(prompt_len + tokens) // 16)
    runtime = ResolvedRuntime(max_num_seqs=batch, max_num_tokens=max(512, batch),
                              context_length=prompt_len + tokens + 16, num_blocks=1 + batch * blocks, block_size=16,
                              block_bytes=0, enable_prefix_caching=False)
    runner = _StandInRunner(runtime)
    engine = Engine(runner, tokenizer)
    emitting = [0.0]
    emit = engine._emit_pending

    def timed_emit():
        start = time.perf_counter()
        emit()
        emitting[0] += time.perf_counter() - start
    engine._emit_pending = timed_emit
    engine.start()
    finished = threading.Semaphore(0)

    def sink(out):
        if out.finish_reason is not None:
            finished.release()
    try:
        start = time.perf_counter()
        for i in range(batch):
            prompt = [(7 * i + j) % VOCAB for j in range(prompt_len)]
            engine.submit(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), sink)
        for _ in range(batch):
            finished.acquire()
        return (time.perf_counter() - start) / runner.calls, emitting[0] / runner.calls
    finally:
        engine.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,16,64,128")
    p.add_argument("--tokens", type=int, default=200)
    args = p.parse_args(argv)
    for batch in map(int, args.batch.split(",")):
        step_s, emit_s = measure(batch, args.tokens)
        print(f"batch {batch:4d}: {step_s * 1e3:.3f} ms of engine time per step, of which emitting "
              f"{emit_s * 1e3:.3f} ms (overlapped by the next step on a GPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
