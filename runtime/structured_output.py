"""Structured output: a request's tokens held to a JSON schema, a regex, an EBNF grammar, a fixed
choice of strings or tool calls, by a token mask at every step.

The grammar library is xgrammar (docs/serving.md says why: of the three candidates, the cheapest
masks at batch 32 with compact JSON and level with llguidance's otherwise, schemas compiled in tens
of milliseconds, and the grammar dialects SGLang and vLLM clients send). This module is the only one
that imports it, lazily: a server that never sees a constraint never loads it.

The life of a constraint:
- the API layer describes it (`Constraint`: one or more `formats`, the output matching any one;
  `prefix`: text the prompt already ends with, such as a forced tool-call opening, which the
  output continues) and `StructuredOutputs.compile`s it on a worker thread, off the engine's and
  the event loop's; a bad schema, regex or grammar raises `ConstraintError`, an HTTP 400;
- the compiled grammar rides in the request's SamplingParams; the engine gives each request its
  own `RequestGrammar` (a matcher, advanced with every committed token);
- each step, `StructuredOutputs.masks` fills one bitmask row per constrained request while the
  device runs the step's forward, and the sampler applies it to that row alone
  (runtime/sampling.py `apply_token_mask`). A batch without constrained requests does no work here.

A grammar ends the output by allowing only the model's end-of-sequence tokens, which end the
request as usual (finish_reason "stop"). With `ignore_eos` the mask drops those tokens while the
grammar allows anything else, so the output goes on as long as the grammar lets it.

JSON whitespace: any whitespace is allowed between JSON elements (as in vLLM and SGLang), but at
most MAX_JSON_WHITESPACE characters in a row, so a small model cannot loop in blanks; `compact`
JSON (vLLM's disable_any_whitespace) allows none beyond ", " and ": ".
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch

from llama_aot.runtime.sampling import TokenMask

MAX_JSON_WHITESPACE = 16  # in a row, between two JSON elements: indentation to depth 7 at 2 spaces
_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))  # compiling, and filling a step's masks
COMPILED_CACHE_SIZE = 256  # compiled grammars kept, by constraint: clients repeat their schemas
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[11:09:22] /project/cpp/x.cc:94: "


class ConstraintError(ValueError):
    """A constraint that cannot be compiled (a bad schema, regex or grammar, or no xgrammar);
    `param` is the request field to blame, for the HTTP 400's `error.param`."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def canonical(value: Any) -> str:
    """Compact JSON text, the key of the compiled-grammar cache. Keys keep their order: a schema's
    properties are generated in the order it declares them."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class JsonSchema:
    """JSON matching `schema` (a JSON Schema as canonical JSON text; "" for any JSON object)."""

    schema: str = ""
    compact: bool = False

    @staticmethod
    def of(schema: Any, compact: bool = False) -> JsonSchema:
        return JsonSchema("" if schema is None else canonical(schema), compact)


@dataclass(frozen=True)
class Regex:
    pattern: str


@dataclass(frozen=True)
class Grammar:
    """A context-free grammar: GBNF (llama.cpp's EBNF, `root ::= ...`), or Lark (`start: ...`)."""

    text: str


@dataclass(frozen=True)
class Choice:
    """Exactly one of `options`."""

    options: tuple[str, ...]


@dataclass(frozen=True)
class StructuralTag:
    """An xgrammar structural tag (`{"type": "structural_tag", "format": {...}}`), as canonical JSON."""

    text: str


@dataclass(frozen=True)
class Tag:
    """`begin`, then JSON matching `schema` (canonical JSON text), then `end`."""

    begin: str
    schema: str
    end: str


@dataclass(frozen=True)
class TaggedJson:
    """One or more tags, one after another with `separator` between them (one only unless
    `repeat`): a model's tool-call format."""

    tags: tuple[Tag, ...]
    separator: str
    repeat: bool


Format = Union[JsonSchema, Regex, Grammar, Choice, StructuralTag, TaggedJson]


@dataclass(frozen=True)
class Constraint:
    """The output matches one of `formats`, after `prefix` (text the prompt already ends with).
    `param` names the request field the constraint came from, for errors."""

    formats: tuple[Format, ...]
    prefix: str = ""
    param: str | None = None

    def __post_init__(self):
        if not self.formats:
            raise ValueError("a constraint needs at least one format")


@dataclass(frozen=True, eq=False)
class CompiledConstraint:
    """A compiled grammar, ready for requests' matchers; opaque outside this module."""

    grammar: Any
    prefix: str


class RequestGrammar:
    """One request's matcher: where its output stands in the grammar."""

    def __init__(self, compiled: CompiledConstraint):
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled.grammar)
        if compiled.prefix and not self._matcher.accept_string(compiled.prefix):
            raise ValueError(f"the constraint does not accept its own prefix {compiled.prefix!r}")

    @property
    def matcher(self):
        return self._matcher

    def accept(self, token: int) -> bool:
        """Advances past a committed token; False if the grammar does not allow it."""
        return self._matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()


@dataclass
class StructuredOutputs:
    """The engine's grammar side: the compiler (built on first use, from the serving tokenizer),
    the bitmask buffer and the threads that fill it. `compile` may be called from any thread;
    `masks` from the engine's."""

    tokenizer: Any  # a `tokenizers.Tokenizer`
    vocab_size: int  # the model's: the logits' width, which may exceed the tokenizer's
    stop_token_ids: tuple[int, ...]
    max_rows: int
    device: torch.device | str = "cpu"
    _compiler: Any = None
    _batch: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cache: OrderedDict = field(default_factory=OrderedDict)
    _bitmask: torch.Tensor | None = None

    def _backend(self):
        """The xgrammar compiler, built once: reading the vocabulary takes ~1.6 s for Llama 3's."""
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar
                except ImportError:
                    raise ConstraintError("structured output needs the xgrammar package, which this server "
                                          "lacks: pip install 'llama-aot[serve]'", None) from None
                from transformers import PreTrainedTokenizerFast

                info = xgrammar.TokenizerInfo.from_huggingface(
                    PreTrainedTokenizerFast(tokenizer_object=self.tokenizer), vocab_size=self.vocab_size,
                    stop_token_ids=list(self.stop_token_ids))
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=_THREADS)
            return self._compiler

    def warm_up(self) -> None:
        """Builds the compiler now (a server calls this on a background thread at start), so the
        first constrained request does not wait for it. Without xgrammar it does nothing."""
        try:
            self._backend()
        except ConstraintError:
            pass

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        """The constraint's grammar, from the cache when a request asked the same before; raises
        ConstraintError with the library's reason for one that does not compile."""
        try:
            compiler = self._backend()
        except ConstraintError as e:
            raise ConstraintError(str(e), constraint.param) from None
        with self._lock:
            if constraint in self._cache:
                self._cache.move_to_end(constraint)
                return self._cache[constraint]
        try:
            compiled = CompiledConstraint(_compile(compiler, constraint.formats), constraint.prefix)
            RequestGrammar(compiled)  # checks the prefix
        except (RuntimeError, ValueError, TypeError) as e:
            where = f"{constraint.param}: " if constraint.param else ""
            raise ConstraintError(where + _reason(e), constraint.param) from None
        with self._lock:
            self._cache[constraint] = compiled
            while len(self._cache) > COMPILED_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def masks(self, grammars: list[RequestGrammar], rows: list[int], ignore_eos: list[bool]) -> TokenMask:
        """The allowed tokens of each grammar's next token, for logits rows `rows`, on the device.
        For an `ignore_eos` row the stop tokens are dropped wherever the grammar allows more."""
        if self._bitmask is None:
            words = (self.vocab_size + 31) // 32
            self._bitmask = torch.empty((self.max_rows, words), dtype=torch.int32,
                                        pin_memory=torch.device(self.device).type == "cuda")
        if self._batch is None:
            import xgrammar

            self._batch = xgrammar.BatchGrammarMatcher(max_threads=_THREADS)
        bits = self._bitmask[:len(grammars)]
        self._batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bits)
        for i in (i for i, flag in enumerate(ignore_eos) if flag):
            self._drop_stop_tokens(bits[i].numpy())
        if torch.device(self.device).type != "cpu":
            # The sampler's .tolist() waits for this copy before the next step refills the buffer.
            bits = bits.to(self.device, non_blocking=True)
        return TokenMask(rows, bits)

    def _drop_stop_tokens(self, row: np.ndarray) -> None:
        words = row.view(np.uint32)
        kept = words.copy()
        for token in self.stop_token_ids:
            words[token // 32] &= ~np.uint32(1 << (token % 32))
        if not words.any():  # the grammar is complete: only a stop token can follow
            words[:] = kept


def _compile(compiler, formats: tuple[Format, ...]):
    """The compiler's own entry point for a lone JSON schema, regex or grammar (its cache keys on
    their text); a union of the formats' grammars otherwise."""
    import xgrammar

    f = formats[0]
    if len(formats) == 1 and isinstance(f, JsonSchema):
        return compiler.compile_json_schema(f.schema or '{"type": "object"}', any_whitespace=not f.compact,
                                            max_whitespace_cnt=None if f.compact else MAX_JSON_WHITESPACE,
                                            strict_mode=True)
    if len(formats) == 1 and isinstance(f, Regex):
        return compiler.compile_regex(f.pattern)
    if len(formats) == 1 and isinstance(f, Grammar):
        return compiler.compile_grammar(f.text) if "::=" in f.text else compiler.compile_lark(f.text)
    grammars = [_grammar(f) for f in formats]
    return compiler.compile_grammar(grammars[0] if len(grammars) == 1 else xgrammar.Grammar.union(*grammars))


def _grammar(f: Format):
    """One format as an uncompiled xgrammar Grammar, for a union of several."""
    import xgrammar

    G = xgrammar.Grammar
    if isinstance(f, JsonSchema):
        return G.from_json_schema(f.schema or '{"type": "object"}', any_whitespace=not f.compact,
                                  max_whitespace_cnt=None if f.compact else MAX_JSON_WHITESPACE, strict_mode=True)
    if isinstance(f, Regex):
        return G.from_regex(f.pattern)
    if isinstance(f, Grammar):
        if "::=" not in f.text:
            raise ValueError("a Lark grammar cannot be combined with tool calls; write it in GBNF (root ::= ...)")
        return G.from_ebnf(f.text)
    if isinstance(f, StructuralTag):
        return G.from_structural_tag(f.text)
    return G.from_structural_tag(canonical({"type": "structural_tag", "format": _format(f)}))


def _format(f: Format) -> dict:
    """A format in xgrammar's structural-tag terms."""
    if isinstance(f, Choice):
        return {"type": "or", "elements": [{"type": "const_string", "value": o} for o in f.options]}
    if isinstance(f, TaggedJson):
        tags = [{"type": "tag", "begin": t.begin, "end": t.end,
                 "content": {"type": "json_schema", "json_schema": json.loads(t.schema),
                             "max_whitespace_cnt": MAX_JSON_WHITESPACE}} for t in f.tags]
        return {"type": "tags_with_separator", "tags": tags, "separator": f.separator, "at_least_one": True,
                "stop_after_first": not f.repeat}
    raise TypeError(f"not a structural-tag format: {f!r}")


def _reason(e: Exception) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    lines = [_XGRAMMAR_LOCATION.sub("", line).strip() for line in str(e).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(e).__name__
