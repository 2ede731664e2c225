"""Structured output's cost, measured two ways (docs/serving.md, "Structured output").

  python -m llama_aot.bench.structured_output masks [--batch 32] [--tokenizer DIR ...]
      Per step at a batch of constrained rows, on this CPU: the grammar library's mask fill, the
      sampler's apply (llama_aot.runtime.sampling.apply_token_mask) and the matchers' advance, while
      each row walks a nested JSON document token by token. xgrammar (what the server uses, through
      runtime/structured_output.py), and llguidance and outlines-core where they are installed.
      Default tokenizers: the embedded default model's (49152 tokens) and Meta's Llama 3 (128256).

  python -m llama_aot.bench.structured_output serve --base-url http://127.0.0.1:8000 [--concurrency 32]
      Against a running llama-serve (or any OpenAI-compatible server): the same chat requests at a
      fixed concurrency, free (ignore_eos) and with a JSON schema on every request, in alternating
      rounds; prints each round's output tokens/s and the ratio of the medians.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from llama_aot.compiler.package import git_sha

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                "required": ["street", "city"], "additionalProperties": False},
    "pets": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "kind": {"enum": ["cat", "dog", "fish"]}, "age": {"type": "integer"}},
        "required": ["name", "kind", "age"], "additionalProperties": False}},
    "verified": {"type": "boolean"}},
    "required": ["name", "age", "address", "pets", "verified"], "additionalProperties": False}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "address": {"street": "12 St James's Square", "city": "London"},
            "pets": [{"name": "Puff", "kind": "cat", "age": 3}, {"name": "Rex the third", "kind": "dog", "age": 11}],
            "verified": True}


# ------------------------------------------------------------------------------------------ masks

def _xgrammar(tokenizer, vocab, eos, batch, compact):
    from llama_aot.runtime import structured_output as so

    outputs = so.StructuredOutputs(tokenizer, vocab, (eos,), max_rows=batch)
    start = time.perf_counter()
    outputs.warm_up()  # the vocabulary, once per server
    vocab_s = time.perf_counter() - start
    compiled = outputs.compile(so.Constraint((so.JsonSchema.of(SCHEMA, compact),)))
    compile_s = time.perf_counter() - start - vocab_s
    grammars = [so.RequestGrammar(compiled) for _ in range(batch)]
    rows = list(range(batch))

    def fill():
        return outputs.masks(grammars, rows, [False] * batch)

    def accept(token):
        for g in grammars:
            assert g.accept(token)
    return vocab_s, compile_s, fill, accept


def _llguidance(tokenizer, vocab, eos, batch, compact):
    import llguidance
    import llguidance.torch as lt
    import torch

    from llama_aot.runtime import structured_output as so
    from llama_aot.runtime.sampling import TokenMask

    start = time.perf_counter()
    lltok = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab, eos_token=eos)
    vocab_s = time.perf_counter() - start
    options = ({"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "} if compact else
               {"whitespace_pattern": "[ \\t\\n\\r]{0,%d}" % so.MAX_JSON_WHITESPACE})
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=options)
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(batch)]
    compile_s = time.perf_counter() - start - vocab_s
    assert not matchers[0].is_error(), matchers[0].get_error()
    bits = torch.empty((batch, (vocab + 31) // 32), dtype=torch.int32)
    executor = llguidance.LLExecutor(num_threads=so._THREADS)
    pairs = [(m, i) for i, m in enumerate(matchers)]

    def fill():
        lt.fill_next_token_bitmask_par(executor, pairs, bits)
        return TokenMask(list(range(batch)), bits)

    def accept(token):
        for m in matchers:
            assert m.consume_token(token), m.get_error()
    return vocab_s, compile_s, fill, accept


def _outlines_core(tokenizer, vocab, eos, batch, compact):
    import outlines_core
    import torch
    from outlines_core.json_schema import build_regex_from_schema

    from llama_aot.runtime import structured_output as so
    from llama_aot.runtime.sampling import TokenMask

    start = time.perf_counter()
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    tokens: dict[bytes, list[int]] = {}
    for text, i in tokenizer.get_vocab().items():
        if i != eos:
            raw = bytes(byte_of[c] for c in text) if all(c in byte_of for c in text) else text.encode()
            tokens.setdefault(raw, []).append(i)
    vocabulary = outlines_core.Vocabulary(eos, tokens)
    vocab_s = time.perf_counter() - start
    whitespace = "[ ]?" if compact else "[ \\t\\n\\r]{0,%d}" % so.MAX_JSON_WHITESPACE
    index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=whitespace), vocabulary)
    compile_s = time.perf_counter() - start - vocab_s
    guides = [outlines_core.Guide(index) for _ in range(batch)]
    bits = torch.zeros((batch, (vocab + 31) // 32), dtype=torch.int32)

    def fill():
        for row, guide in zip(bits, guides):
            guide.write_mask_into(row.data_ptr(), row.numel(), 4)
        return TokenMask(list(range(batch)), bits)

    def accept(token):
        if token != eos:  # its final states take EOS implicitly
            for g in guides:
                g.advance(token, return_tokens=False)
    return vocab_s, compile_s, fill, accept


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet, for outlines-core's vocabulary of raw bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


LIBRARIES = {"xgrammar": _xgrammar, "llguidance": _llguidance, "outlines-core": _outlines_core}


def _tokenizers(paths: list[Path]):
    from tokenizers import Tokenizer

    if paths:
        for path in paths:
            tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
            yield path.name, tok
        return
    from llama_aot.compiler.gguf_import import default_checkpoint

    yield "SmolLM2 (the embedded default)", Tokenizer.from_file(str(default_checkpoint() / "tokenizer.json"))
    try:
        from llama_aot.bench.llama3_tokenizer import llama3_tokenizer_json
    except ImportError:
        return
    yield "Llama 3", Tokenizer.from_str(llama3_tokenizer_json())


def masks(args) -> None:
    import torch

    from llama_aot.runtime.sampling import apply_token_mask

    from llama_aot.runtime.structured_output import MAX_JSON_WHITESPACE as MAX_WS

    torch.set_num_threads(1)
    print(f"batch {args.batch}; ms per step, mean (max) over the document's tokens; JSON whitespace: compact "
          f"(', ' and ': ' only) or bounded (up to {MAX_WS} in a row, what the server allows)")
    print("| tokenizer | vocab | library | whitespace | vocabulary s | compile s | fill | apply | advance | total |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, tok in _tokenizers(args.tokenizer):
        vocab = tok.get_vocab_size()
        eos = next((tok.token_to_id(t) for t in ("<|eot_id|>", "<|im_end|>", "</s>") if tok.token_to_id(t) is not None), 0)
        ids = tok.encode(json.dumps(DOCUMENT), add_special_tokens=False).ids + [eos]
        logits = torch.randn(args.batch, vocab)
        for library, make in LIBRARIES.items():
            for compact in (True, False):
                whitespace = "compact" if compact else "bounded"
                try:
                    vocab_s, compile_s, fill, accept = make(tok, vocab, eos, args.batch, compact)
                except ImportError:
                    print(f"| {name} | {vocab} | {library} | {whitespace} | not installed | | | | | |")
                    break
                times = {"fill": [], "apply": [], "advance": []}
                for token in ids:
                    t0 = time.perf_counter()
                    mask = fill()
                    t1 = time.perf_counter()
                    apply_token_mask(logits, mask)
                    t2 = time.perf_counter()
                    accept(token)
                    t3 = time.perf_counter()
                    for key, took in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                        times[key].append(took * 1e3)
                    logits.normal_()
                cell = {k: f"{statistics.mean(v):.3f} ({max(v):.2f})" for k, v in times.items()}
                total = statistics.mean(map(sum, zip(*times.values())))
                print(f"| {name} | {vocab} | {library} | {whitespace} | {vocab_s:.2f} | {compile_s:.3f} | {cell['fill']} | "
                      f"{cell['apply']} | {cell['advance']} | {total:.3f} |", flush=True)


# ------------------------------------------------------------------------------------------ serve

async def _round(client, url, model, prompts, constrained: bool, args) -> dict:
    semaphore = asyncio.Semaphore(args.concurrency)
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "Person", "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True

    async def one(prompt):
        async with semaphore:
            r = await client.post(url, json={**body, "messages": [{"role": "user", "content": prompt}]})
            r.raise_for_status()
            reply = r.json()
            if constrained and reply["choices"][0]["finish_reason"] == "stop":
                json.loads(reply["choices"][0]["message"]["content"])  # a finished reply must parse
            return reply["usage"]["completion_tokens"]

    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    return {"constrained": constrained, "tokens": sum(tokens), "seconds": wall, "tok_s": sum(tokens) / wall,
            "mean_tokens": statistics.mean(tokens)}


async def _serve(args) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout, headers=headers,
                                 limits=httpx.Limits(max_connections=args.concurrency + 4)) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = [f"Describe person number {i}, who lives in city {i % 17}, and their pets, as a JSON record."
                   for i in range(args.num_prompts)]
        url = "/v1/chat/completions"
        await _round(client, url, model, prompts[:args.concurrency], True, args)  # warm-up: compiles the schema
        rounds = []
        for r in range(args.rounds):
            for constrained in (False, True):
                rounds.append(await _round(client, url, model, prompts, constrained, args))
                print(f"round {r} {'json schema' if constrained else 'free       '}: {rounds[-1]['tok_s']:8.1f} "
                      f"output tok/s ({rounds[-1]['tokens']} tokens, {rounds[-1]['mean_tokens']:.1f} a request, "
                      f"{rounds[-1]['seconds']:.1f} s)", flush=True)
    free = statistics.median(r["tok_s"] for r in rounds if not r["constrained"])
    constrained = statistics.median(r["tok_s"] for r in rounds if r["constrained"])
    print(f"median output tok/s at concurrency {args.concurrency}: free {free:.1f}, json schema {constrained:.1f}, "
          f"ratio {constrained / free:.3f}")
    return {"kind": "structured-output-throughput", "model": model, "concurrency": args.concurrency,
            "num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "rounds": rounds,
            "free_tok_s": free, "json_tok_s": constrained, "ratio": constrained / free, "git_sha": git_sha()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("masks", help="mask cost per step on this CPU, by grammar library")
    m.add_argument("--batch", type=int, default=32)
    m.add_argument("--tokenizer", type=Path, action="append", default=[],
                   help="a tokenizer.json or a directory with one (repeatable)")
    s = sub.add_parser("serve", help="throughput with and without a JSON schema against a running server")
    s.add_argument("--base-url", default="http://127.0.0.1:8000")
    s.add_argument("--model", help="default: the first id of /v1/models")
    s.add_argument("--concurrency", type=int, default=32)
    s.add_argument("--num-prompts", type=int, default=128)
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--timeout", type=float, default=600.0)
    s.add_argument("--api-key")
    s.add_argument("--output-file", type=Path, help="append the figures here as one JSON line")
    args = p.parse_args(argv)
    if args.command == "masks":
        masks(args)
        return 0
    record = asyncio.run(_serve(args))
    if args.output_file:
        with args.output_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
