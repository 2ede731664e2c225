"""The request bodies of the OpenAI routes, as strict pydantic models.

Strict: a field of the wrong type is a 400 naming that field, not a silent coercion ("1" is not
a max_tokens). Fields OpenAI defines but we do not implement are either accepted with OpenAI's
meaning (user, parallel_tool_calls) or refused by name (best_of); unknown extra fields are
ignored, as the OpenAI API ignores them.
Range checks of sampling values live in SamplingParams, the one place that knows them.

Structured output, on both routes, under the names clients already send (docs/serving.md):
OpenAI's `response_format` (json_object, json_schema, and SGLang's and vLLM's structural_tag);
SGLang's `regex`, `ebnf` and `json_schema`; vLLM's `structured_outputs` and its older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and `guided_decoding_backend`. One of them per
request; an option we cannot honour (a custom whitespace pattern, another backend) is a 400.
"""
from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llama_aot.runtime import structured_output as so
from llama_aot.runtime.sampling import SamplingParams
from llama_aot.serve.errors import APIError


MAX_CHOICES = 128  # OpenAI's bound on n
_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for response_format.json_schema.name
_VLLM_KEYS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
_VLLM_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern", "disable_fallback")
# vLLM's guided_decoding_backend: the backend, then options after a colon ("xgrammar:no-fallback").
_BACKENDS = ("auto", "xgrammar")
_BACKEND_OPTIONS = ("no-fallback", "disable-any-whitespace", "no-additional-properties")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def template_kwargs(requested: dict[str, Any] | None) -> dict[str, Any]:
    """A request's extra chat-template variables; the ones the server sets itself cannot be overridden."""
    kwargs = dict(requested or {})
    reserved = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt", "documents"})
    if reserved:
        raise APIError(400, f"chat_template_kwargs cannot set {', '.join(reserved)}; use the request's "
                       "own fields", "chat_template_kwargs")
    return kwargs


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    regex: str | None = None  # SGLang's regex, ebnf and json_schema
    ebnf: str | None = None
    json_schema: str | dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's, since 0.11
    guided_json: str | dict[str, Any] | None = None  # vLLM's before 0.12
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None

    def output_format(self) -> tuple[so.Format, str] | None:
        """The format the output must match and the field it came from, or None for free text."""
        found = [(param, fmt) for param, fmt in self._formats() if fmt is not None]
        if len(found) > 1:
            raise APIError(400, f"give at most one structured-output field; this request has "
                           f"{' and '.join(p for p, _ in found)}", found[1][0])
        options = _backend_options(self.guided_decoding_backend)
        if self.guided_whitespace_pattern is not None:
            raise APIError(400, "guided_whitespace_pattern is not supported: this server allows up to "
                           f"{so.MAX_JSON_WHITESPACE} whitespace characters between JSON elements; ask for "
                           "none with structured_outputs.disable_any_whitespace", "guided_whitespace_pattern")
        if not found:
            return None
        param, fmt = found[0]
        if isinstance(fmt, so.JsonSchema) and param.startswith("guided_"):
            if "no-additional-properties" in options and fmt.schema:
                fmt = so.JsonSchema.of(_closed(json.loads(fmt.schema)), fmt.compact)
            if "disable-any-whitespace" in options:
                fmt = so.JsonSchema(fmt.schema, compact=True)
        return fmt, param

    def _formats(self):
        yield "response_format", _response_format(self.response_format)
        yield "regex", None if self.regex is None else so.Regex(self.regex)
        yield "ebnf", None if self.ebnf is None else so.Grammar(self.ebnf)
        yield "json_schema", None if self.json_schema is None else so.JsonSchema.of(_schema(self.json_schema,
                                                                                             "json_schema"))
        yield "structured_outputs", _vllm_format(self.structured_outputs)
        yield "guided_json", None if self.guided_json is None else so.JsonSchema.of(_schema(self.guided_json,
                                                                                             "guided_json"))
        yield "guided_regex", None if self.guided_regex is None else so.Regex(self.guided_regex)
        yield "guided_choice", None if self.guided_choice is None else _choice(self.guided_choice, "guided_choice")
        yield "guided_grammar", None if self.guided_grammar is None else so.Grammar(self.guided_grammar)

    def _sampling(self, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
        values = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "seed",
                                                 "presence_penalty", "frequency_penalty",
                                                 "repetition_penalty") if getattr(self, k) is not None}
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        return SamplingParams(**values, max_tokens=max_tokens, stop=self.stop,
                              stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
                              logprobs=logprobs, top_logprobs=top_logprobs)

    def choices(self) -> int:
        """How many completions of the prompt the request asks for (OpenAI's `n`)."""
        n = 1 if self.n is None else self.n
        if not 1 <= n <= MAX_CHOICES:
            raise APIError(400, f"n must be between 1 and {MAX_CHOICES}, got {n}", "n")
        return n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def template_kwargs(self) -> dict[str, Any]:
        return template_kwargs(self.chat_template_kwargs)

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{param} must be at least 1, got {max_tokens}", param)
        return self._sampling(max_tokens, self.logprobs, self.top_logprobs or 0)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def sampling_params(self) -> SamplingParams:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        for name in ("echo", "best_of", "suffix"):
            if getattr(self, name) not in (None, False, 1):
                raise APIError(400, f"{name} is not supported", name)
        if self.logprobs is not None and not 0 <= self.logprobs <= 5:
            raise APIError(400, f"logprobs must be between 0 and 5, got {self.logprobs}", "logprobs")
        return self._sampling(self.max_tokens, self.logprobs is not None, self.logprobs or 0)

    def single_prompt(self) -> str | list[int]:
        """One prompt, as text or token ids; a batch of several is refused (send one request each)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, "a batch of prompts is not supported; send one request per prompt", "prompt")
            p = p[0]
        if (isinstance(p, str) and not p) or (isinstance(p, list) and not p):
            raise APIError(400, "prompt must not be empty", "prompt")
        return p


class TokenizeRequest(_Strict):
    """POST /tokenize, as vLLM takes it (SGLang's `prompt` form is the same): a text `prompt`, or
    chat `messages` rendered by the model's chat template first."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def checked(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        if self.messages is not None and not self.messages:
            raise APIError(400, "messages must not be empty", "messages")
        if self.messages is not None and self.add_special_tokens:
            raise APIError(400, "add_special_tokens applies to a prompt; the chat template adds the "
                           "special tokens of messages", "add_special_tokens")
        return self

    def template_kwargs(self) -> dict[str, Any]:
        return template_kwargs(self.chat_template_kwargs)


class DetokenizeRequest(_Strict):
    """POST /detokenize: token ids back to text (vLLM answers {"prompt"}, SGLang {"text"})."""

    model: str | None = None
    tokens: list[int]
    skip_special_tokens: bool = False


# ------------------------------------------------------------------------------ structured output


def _schema(value: Any, param: str) -> Any:
    """A JSON Schema given as an object, a boolean, or JSON text (SGLang's json_schema is a string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise APIError(400, f"{param} is not valid JSON ({e.msg} at character {e.pos})", param) from None
    if not isinstance(value, (dict, bool)):
        raise APIError(400, f"{param} must be a JSON Schema (an object), got {type(value).__name__}", param)
    return value


def _choice(options: Any, param: str) -> so.Choice:
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise APIError(400, f"{param} must be a non-empty list of strings", param)
    return so.Choice(tuple(options))


def _closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object in it (vLLM's
    disable_additional_properties)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out["additionalProperties"] = False
    return out


def _response_format(rf: dict | None) -> so.Format | None:
    if rf is None:
        return None
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return so.JsonSchema.of(None)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        where = "response_format.json_schema"
        if not isinstance(spec, dict):
            raise APIError(400, f"{where} must be an object with a name and a schema", where)
        if not isinstance(spec.get("name"), str) or not _SCHEMA_NAME.match(spec["name"]):
            raise APIError(400, f"{where}.name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -, got "
                           f"{spec.get('name')!r}", f"{where}.name")
        for key, kinds in (("strict", (bool,)), ("description", (str,))):
            if spec.get(key) is not None and not isinstance(spec[key], kinds):
                raise APIError(400, f"{where}.{key} must be a {kinds[0].__name__}", f"{where}.{key}")
        # strict or not, the output is held to the schema, as vLLM and SGLang hold it.
        schema = spec.get("schema")
        return so.JsonSchema.of(None if schema is None else _schema(schema, f"{where}.schema"))
    if kind == "structural_tag":
        return _structural_tag(rf)
    raise APIError(400, f"response_format.type must be one of text, json_object, json_schema and structural_tag, "
                   f"got {kind!r}", "response_format.type")


def _structural_tag(rf: dict) -> so.StructuralTag:
    """xgrammar's structural tag ({"format": {...}}), or the older form SGLang and vLLM also take
    ({"structures": [{"begin", "schema", "end"}], "triggers": [...]})."""
    if "format" in rf:
        return so.StructuralTag(so.canonical({"type": "structural_tag", "format": rf["format"]}))
    structures, triggers = rf.get("structures"), rf.get("triggers")
    where = "response_format.structures"
    if not isinstance(structures, list) or not structures or not isinstance(triggers, list) \
            or not all(isinstance(t, str) for t in triggers):
        raise APIError(400, "a structural_tag response_format needs a format, or structures and triggers", where)
    tags = []
    for i, st in enumerate(structures):
        if not isinstance(st, dict) or not isinstance(st.get("begin"), str) or not isinstance(st.get("end"), str):
            raise APIError(400, f"{where}[{i}] must be an object with begin, schema and end", f"{where}[{i}]")
        schema = _schema(st.get("schema"), f"{where}[{i}].schema")
        tags.append({"type": "tag", "begin": st["begin"], "end": st["end"],
                     "content": {"type": "json_schema", "json_schema": schema}})
    return so.StructuralTag(so.canonical({"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": triggers, "tags": tags}}))


def _vllm_format(spec: dict | None) -> so.Format | None:
    """vLLM's `structured_outputs` object: one of json, regex, choice, grammar, json_object and
    structural_tag, with its whitespace and additional-properties options."""
    if spec is None:
        return None
    where = "structured_outputs"
    unknown = sorted(set(spec) - set(_VLLM_KEYS) - set(_VLLM_OPTIONS))
    if unknown:
        raise APIError(400, f"{where}.{unknown[0]} is not supported; use one of {', '.join(_VLLM_KEYS)}",
                       f"{where}.{unknown[0]}")
    if spec.get("whitespace_pattern") is not None:
        raise APIError(400, f"{where}.whitespace_pattern is not supported: this server allows up to "
                       f"{so.MAX_JSON_WHITESPACE} whitespace characters between JSON elements; ask for none with "
                       "disable_any_whitespace", f"{where}.whitespace_pattern")
    for key in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback", "json_object"):
        if spec.get(key) is not None and not isinstance(spec[key], bool):
            raise APIError(400, f"{where}.{key} must be true or false", f"{where}.{key}")
    given = [k for k in _VLLM_KEYS if spec.get(k) not in (None, False)]
    if len(given) != 1:
        raise APIError(400, f"{where} must give exactly one of {', '.join(_VLLM_KEYS)}", where)
    key, value, compact = given[0], spec[given[0]], bool(spec.get("disable_any_whitespace"))
    if key in ("json", "json_object"):
        schema = None if key == "json_object" else _schema(value, f"{where}.json")
        if spec.get("disable_additional_properties") and schema is not None:
            schema = _closed(schema)
        return so.JsonSchema.of(schema, compact)
    if key == "choice":
        return _choice(value, f"{where}.choice")
    if not isinstance(value, str):
        raise APIError(400, f"{where}.{key} must be a string", f"{where}.{key}")
    if key == "regex":
        return so.Regex(value)
    if key == "grammar":
        return so.Grammar(value)
    try:  # structural_tag: JSON text, as vLLM takes it
        tag = json.loads(value)
    except json.JSONDecodeError as e:
        raise APIError(400, f"{where}.structural_tag is not valid JSON ({e.msg})", f"{where}.structural_tag") from None
    if not isinstance(tag, dict):
        raise APIError(400, f"{where}.structural_tag must be a JSON object", f"{where}.structural_tag")
    return _structural_tag(tag)


def _backend_options(backend: str | None) -> set[str]:
    """The options of vLLM's older guided_decoding_backend ("xgrammar:disable-any-whitespace"); a
    backend other than ours (or "auto") is refused rather than silently replaced."""
    if backend is None:
        return set()
    name, _, options = backend.partition(":")
    chosen = {o.strip() for o in options.split(",") if o.strip()}
    if name not in _BACKENDS or not chosen <= set(_BACKEND_OPTIONS):
        raise APIError(400, f"guided_decoding_backend {backend!r} is not available: this server constrains output "
                       f"with xgrammar (options: {', '.join(_BACKEND_OPTIONS)})", "guided_decoding_backend")
    return chosen
