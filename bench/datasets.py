"""Prompt sets for `llama-bench serve`, sampled by SGLang bench_serving's rules so that our numbers
compare with the ones people publish for vLLM and SGLang.

Token counts come from the served model's own tokenizer: `tokenizer.json` in a local directory
(--tokenizer DIR, typically the artifact directory), or else the server itself through its
POST /tokenize and /detokenize routes (RemoteTokenizer), as llama-serve, vLLM and SGLang serve them.
A count made with any other vocabulary would make "1000 input tokens" mean something else than what
the server prefills. The server's reported usage remains the authority for the measured totals;
these counts only shape the prompts (and give bench_serving's retokenized output count).
"""
from __future__ import annotations

import asyncio
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


@dataclass(frozen=True)
class Encoding:
    """What RemoteTokenizer.encode returns: the ids, as `tokenizers`' Encoding carries them."""

    ids: list[int]


class RemoteTokenizer:
    """The server's own tokenizer over HTTP, with the interface the samplers use of a `tokenizers`
    Tokenizer: encode(text, add_special_tokens=...).ids, encode_batch(texts, ...) and decode(ids).

    POST /tokenize {"prompt", "add_special_tokens"} -> {"tokens", "count"} and POST /detokenize
    {"tokens"} -> {"prompt"} (vLLM) or {"text"} (SGLang); llama-serve answers both keys. Encodings
    are cached by text, so the samplers' repeated encodes cost one call, and encode_batch sends
    what is not cached concurrently. Any failure is a BenchInputError that names --tokenizer."""

    BATCH_CONCURRENCY = 16

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0):
        import httpx

        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout_s
        self._client = httpx.Client(headers=self._headers, timeout=timeout_s)
        self._encoded: dict[tuple[str, bool], list[int]] = {}
        self.calls = 0  # requests sent, for whoever wants to know what the counting cost

    def _failed(self, route: str, why: str) -> BenchInputError:
        return BenchInputError(f"counting tokens with the server's tokenizer: POST {self.base_url}{route} {why}; "
                               "pass --tokenizer DIR, a directory with the served model's tokenizer.json")

    def _answer(self, route: str, response) -> dict:
        if response.status_code != 200:
            body = " ".join(response.text.split())[:200]
            raise self._failed(route, f"answered HTTP {response.status_code} ({body})")
        try:
            data = response.json()
        except ValueError:
            raise self._failed(route, "answered something that is not JSON") from None
        if not isinstance(data, dict):
            raise self._failed(route, "answered JSON that is not an object")
        return data

    def _ids(self, data: dict) -> list[int]:
        ids = data.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise self._failed("/tokenize", "answered without a list of token ids in \"tokens\"")
        return ids

    def _post(self, route: str, body: dict) -> dict:
        import httpx

        self.calls += 1
        try:
            response = self._client.post(self.base_url + route, json=body)
        except httpx.HTTPError as e:
            raise self._failed(route, f"failed ({type(e).__name__}: {e})") from None
        return self._answer(route, response)

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        key = (text, bool(add_special_tokens))
        if key not in self._encoded:
            data = self._post("/tokenize", {"prompt": text, "add_special_tokens": bool(add_special_tokens)})
            self._encoded[key] = self._ids(data)
        return Encoding(list(self._encoded[key]))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[Encoding]:
        """encode() of each text; the ones not yet cached go out BATCH_CONCURRENCY at a time."""
        missing = list(dict.fromkeys(t for t in texts if (t, bool(add_special_tokens)) not in self._encoded))
        if missing:
            for text, ids in zip(missing, asyncio.run(self._tokenize_all(missing, bool(add_special_tokens)))):
                self._encoded[(text, bool(add_special_tokens))] = ids
        return [self.encode(t, add_special_tokens) for t in texts]

    async def _tokenize_all(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        import httpx

        gate = asyncio.Semaphore(self.BATCH_CONCURRENCY)
        async with httpx.AsyncClient(headers=self._headers, timeout=self._timeout) as client:
            async def one(text: str) -> list[int]:
                async with gate:
                    self.calls += 1
                    try:
                        response = await client.post(self.base_url + "/tokenize",
                                                     json={"prompt": text, "add_special_tokens": add_special_tokens})
                    except httpx.HTTPError as e:
                        raise self._failed("/tokenize", f"failed ({type(e).__name__}: {e})") from None
                    return self._ids(self._answer("/tokenize", response))

            return list(await asyncio.gather(*(one(t) for t in texts)))

    def decode(self, ids: list[int]) -> str:
        data = self._post("/detokenize", {"tokens": list(ids)})
        text = data.get("text", data.get("prompt"))
        if not isinstance(text, str):
            raise self._failed("/detokenize", "answered without the text in \"text\" or \"prompt\"")
        return text

    def close(self) -> None:
        self._client.close()


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """How many tokens each text is, without special tokens, as bench_serving retokenizes the
    generated text: one encode_batch (`tokenizers` batches it; RemoteTokenizer sends it concurrently)."""
    if not texts:
        return []
    return [len(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


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
