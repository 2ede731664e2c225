"""Render an OpenAI chat request into prompt token ids with the checkpoint's own chat template.

Why the checkpoint's template and not our own formatter: the template is what the model was tuned
on, and it is the contract every other server (transformers, vLLM, SGLang) honours. Rendering it the
way `transformers`' `apply_chat_template` does makes our prompts byte-identical to theirs:

- a sandboxed environment (`ImmutableSandboxedEnvironment`): templates come from the Hub and are
  untrusted code; with `trim_blocks` and `lstrip_blocks`, the whitespace rules templates are
  written for, and the `loopcontrols` extension;
- the globals and filters templates call: `raise_exception`, `strftime_now`, and a `tojson` that
  keeps non-ASCII text and takes `indent` (jinja's own escapes HTML characters);
- the variables: `messages`, `tools`, `documents` (always None), `add_generation_prompt`, the named
  special tokens (`bos_token`, `eos_token`, ...), and any extra template kwargs. Nothing else: in
  particular `date_string` is not passed unless the caller does, so Llama 3.1's template falls back
  to its built-in "26 Jul 2024", exactly as under transformers;
- message keys whose value is None are dropped (OpenAI sends `"content": null` beside tool_calls;
  templates handle a missing key but would print "None").

The request is first normalised from OpenAI's shape into the shape templates expect: content-part
lists become one string, and tool-call `arguments` (a JSON string in OpenAI's API) become dicts,
as transformers documents. Mistakes a client can make raise `RequestError` (a ValueError carrying
the OpenAI error `param`), which the HTTP layer turns into a 400.

The rendered text already contains the template's special tokens (bos included), so it is
tokenized without adding special tokens again.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
# Named special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")


class RequestError(ValueError):
    """A client mistake in a chat request. `param` names the offending field the way OpenAI's
    error objects do ("messages[2].tool_calls[0].function.arguments"), or is None."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in some HF
    templates; transformers parses it, so we must too. For inference it renders its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"the chat template does not compile (line {err.lineno}: {err.message}); "
                         "fix chat_template in the checkpoint and rebuild the artifact") from err


# ----------------------------------------------------------------------------- message normalising


def _text_of(content: Any, where: str) -> str:
    """OpenAI content: a string or a list of parts. Text parts are joined with newlines, as vLLM
    does, so that separate parts do not run into each other; anything else is refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of content parts, got "
                           f"{type(content).__name__}", where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, Mapping):
            raise RequestError(f"{at} must be an object like {{\"type\": \"text\", \"text\": ...}}", at)
        if part.get("type") != "text":
            raise RequestError(f"{at}: content part type {part.get('type')!r} is not supported; this "
                               "model reads text only (parts of type 'text')", at)
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{at}.text must be a string", f"{at}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_call(call: Any, where: str) -> dict:
    """OpenAI's {"id", "type": "function", "function": {"name", "arguments": "<json>"}} with the
    arguments decoded to a dict, the form chat templates read (`tool_call.arguments | tojson`).
    A dict is accepted as is: some clients send one, and it means the same thing."""
    if not isinstance(call, Mapping):
        raise RequestError(f"{where} must be an object", where)
    if call.get("type", "function") != "function":
        raise RequestError(f"{where}.type must be 'function', got {call.get('type')!r}", f"{where}.type")
    function = call.get("function")
    if not isinstance(function, Mapping):
        raise RequestError(f"{where}.function must be an object with name and arguments", f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}.function.name must be a non-empty string", f"{where}.function.name")
    arguments = function.get("arguments", "{}")
    at = f"{where}.function.arguments"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise RequestError(f"{at} is not valid JSON ({err.msg} at character {err.pos}); it must "
                               "be a JSON object encoded as a string", at) from err
    if not isinstance(arguments, Mapping):
        raise RequestError(f"{at} must encode a JSON object, got {type(arguments).__name__}", at)
    out = {k: v for k, v in call.items() if v is not None}
    out["type"] = "function"
    out["function"] = {**{k: v for k, v in function.items() if v is not None}, "arguments": dict(arguments)}
    return out


def normalize_messages(messages: Any) -> list[dict]:
    """Check OpenAI chat messages and turn them into the plain dicts templates read. Unknown keys
    (e.g. `name`) are kept for templates that use them; None values are dropped."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{where} must be an object with role and content", where)
        msg = {k: v for k, v in message.items() if v is not None}
        role = msg.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role {role!r} is not supported; use one of {', '.join(ROLES)}",
                               f"{where}.role")
        if "content" in msg:
            msg["content"] = _text_of(msg["content"], f"{where}.content")
        if "tool_calls" in msg:
            calls = msg["tool_calls"]
            if role != "assistant":
                raise RequestError(f"{where}: only assistant messages carry tool_calls", f"{where}.tool_calls")
            if not isinstance(calls, list) or not calls:
                raise RequestError(f"{where}.tool_calls must be a non-empty list", f"{where}.tool_calls")
            msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        elif "content" not in msg:
            need = "content or tool_calls" if role == "assistant" else "content"
            raise RequestError(f"{where} ({role}) needs {need}", f"{where}.content")
        if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
            raise RequestError(f"{where}: a tool message needs tool_call_id, the id of the call it answers",
                               f"{where}.tool_call_id")
        out.append(msg)
    return out


# ------------------------------------------------------------------------------------ the template


class ChatTemplate:
    """One checkpoint's chat template and tokenizer.

    `template` is the jinja source, or a mapping of named templates (the older multi-template
    tokenizer_config form), from which "tool_use" is picked when tools are given and "default"
    otherwise, as transformers does. `special_tokens` are further named tokens (unk_token, ...).
    """

    def __init__(self, template: str | Mapping[str, str], tokenizer, bos_token: str | None = None,
                 eos_token: str | None = None, **special_tokens: str):
        named = dict(template) if isinstance(template, Mapping) else {"default": template}
        if "default" not in named:
            raise ValueError(f"the checkpoint has named chat templates {sorted(named)} but none called "
                             "'default'; add one to tokenizer_config.json")
        self._templates = {name: _compile(source) for name, source in named.items()}
        self.tokenizer = tokenizer
        tokens = {"bos_token": bos_token, "eos_token": eos_token, **special_tokens}
        self.special_tokens = {k: v for k, v in tokens.items() if v is not None}

    def render(self, messages: list, tools: list | None = None, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt text. `tools` is the OpenAI tool list ({"type": "function", "function":
        {...}}), passed through as transformers passes it; `extra` are further template variables
        (chat_template_kwargs such as date_string), which may override the special tokens."""
        if "documents" in extra:
            raise RequestError("template variable 'documents' is set by the server and cannot be passed "
                               "as a template kwarg", "chat_template_kwargs")
        msgs = normalize_messages(messages)
        template = self._templates.get("tool_use" if tools is not None else "default",
                                       self._templates["default"])
        try:
            return template.render(messages=msgs, tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt,
                                   **{**self.special_tokens, **extra})
        except (jinja2.TemplateError, TypeError) as err:
            # The template works for well-formed conversations, so a failure names this one.
            raise RequestError(f"the model's chat template rejected this conversation: {err}",
                               "messages") from err

    def encode(self, messages: list, tools: list | None = None, add_generation_prompt: bool = True,
               **extra: Any) -> list[int]:
        """Prompt token ids: the rendered text, tokenized without adding bos again."""
        text = self.render(messages, tools, add_generation_prompt, **extra)
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores a special token as a string or as a serialized AddedToken."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_chat_template(artifact_dir: str | os.PathLike) -> ChatTemplate | None:
    """The chat template of an artifact (or HF checkpoint) directory, from the files transformers
    reads: chat_template.jinja first, then tokenizer_config.json's "chat_template" (a string or a
    list of {"name", "template"}); special tokens from tokenizer_config.json, then
    special_tokens_map.json; the tokenizer from tokenizer.json."""
    from tokenizers import Tokenizer

    root = Path(artifact_dir)
    if not (root / "tokenizer.json").is_file():
        raise ValueError(f"{root}: no tokenizer.json; rebuild the artifact from a checkpoint that has one")
    config, special_map = {}, {}
    if (root / "tokenizer_config.json").is_file():
        config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    if (root / "special_tokens_map.json").is_file():
        special_map = json.loads((root / "special_tokens_map.json").read_text(encoding="utf-8"))
    if (root / "chat_template.jinja").is_file():
        template: Any = (root / "chat_template.jinja").read_text(encoding="utf-8")
    else:
        template = config.get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template if isinstance(t, Mapping)}
    if not template:  # a base model: it serves /v1/completions only
        return None
    tokens = {name: _token_text(config.get(name, special_map.get(name))) for name in SPECIAL_TOKEN_NAMES}
    return ChatTemplate(template, Tokenizer.from_file(str(root / "tokenizer.json")),
                        **{k: v for k, v in tokens.items() if v is not None})
