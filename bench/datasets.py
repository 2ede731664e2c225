"""Prompt sets for `llama-bench serve`, sampled by SGLang bench_serving's rules so that our numbers
compare with the ones people publish for vLLM and SGLang.

Token counts come from the served model's own tokenizer (`tokenizer.json` in --tokenizer DIR,
typically the artifact directory): a count made with any other vocabulary would make "1000 input
tokens" mean something else than what the server prefills. The server's reported usage remains
the authority for the measured totals; these counts only shape the prompts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from llama_aot.compiler.sharegpt import PromptSourceError, load_conversations  # noqa: F401  (re-exported)

MIN_SEQUENCE_TOKENS = 4  # bench_serving drops prompts or completions shorter than this
# One error for every problem with the prompts, raised by the ShareGPT reader and by the samplers.
BenchInputError = PromptSourceError


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send: its text, its length in the served tokenizer, and the tokens to generate."""

    prompt: str
    prompt_len: int
    output_len: int

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"lengths must be positive, got prompt {self.prompt_len}, output {self.output_len}")


def load_tokenizer(directory: Path):
    """The served model's tokenizer, from DIR/tokenizer.json."""
    from tokenizers import Tokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise BenchInputError(f"{path} not found: pass --tokenizer DIR, a directory with the served model's "
                           "tokenizer.json (the artifact directory has one)")
    return Tokenizer.from_file(str(path))


def sample_lengths(target: int, range_ratio: float, n: int, rng: random.Random) -> list[int]:
    """bench_serving's random lengths: uniform over the integers in [max(int(target * ratio), 1), target]."""
    if target < 1 or not 0.0 <= range_ratio <= 1.0:
        raise BenchInputError(f"need a length >= 1 and a range ratio in [0, 1], got {target} and {range_ratio}")
    low = max(int(target * range_ratio), 1)
    return [rng.randint(low, target) for _ in range(n)]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def sample_random(tokenizer, pairs: list[tuple[str, str]], n: int, input_len: int, output_len: int,
                  range_ratio: float, seed: int) -> list[BenchRequest]:
    """Prompts of sampled lengths, made of ShareGPT text cut, or repeated then cut, to that length.
    The decoded text may re-encode to a slightly different count; the recorded length is the
    re-encoded one, as what the server will see."""
    rng = random.Random(seed)
    in_lens = sample_lengths(input_len, range_ratio, n, rng)
    out_lens = sample_lengths(output_len, range_ratio, n, rng)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    requests, source = [], iter(order)
    for in_len, out_len in zip(in_lens, out_lens):
        for index in source:
            ids = _encode(tokenizer, pairs[index][0])
            if ids:
                break
        else:
            raise BenchInputError("ran out of non-empty ShareGPT prompts")
        ids = (ids * -(-in_len // len(ids)))[:in_len]
        prompt = tokenizer.decode(ids)
        requests.append(BenchRequest(prompt, max(len(_encode(tokenizer, prompt)), 1), out_len))
    return requests


def sample_sharegpt(tokenizer, pairs: list[tuple[str, str]], n: int, context_len: int, seed: int,
                    output_len: int | None = None) -> list[BenchRequest]:
    """The first n conversations, in a seeded shuffle, that survive bench_serving's filter: prompt and
    reply (or the --sharegpt-output-len override) of at least 4 tokens, and together within the context."""
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    requests = []
    for index in order:
        if len(requests) == n:
            break
        prompt, reply = pairs[index]
        prompt_len = len(_encode(tokenizer, prompt))
        out_len = output_len if output_len is not None else len(_encode(tokenizer, reply))
        if prompt_len < MIN_SEQUENCE_TOKENS or out_len < MIN_SEQUENCE_TOKENS:
            continue
        if prompt_len + out_len > context_len:
            continue
        requests.append(BenchRequest(prompt, prompt_len, out_len))
    if len(requests) < n:
        raise BenchInputError(f"only {len(requests)} ShareGPT conversations fit a context of {context_len} "
                           f"tokens; ask for fewer --num-prompts or a shorter --sharegpt-output-len")
    return requests
