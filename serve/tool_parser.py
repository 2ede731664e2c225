"""Tool calls out of Llama 3.x output (`--tool-call-parser llama3`), and tool_choice handling.

Llama 3.1's chat template asks for calls as JSON, `{"name": function name, "parameters": {...}}`;
the model may put `<|python_tag|>` in front (it is a special token, so the detokenizer must keep
it for the parser to see it), write "arguments" instead of "parameters", add Meta's
`"type": "function"`, and chain several calls with `;`. That is the format vLLM's and SGLang's
llama3 JSON parsers read. The rules here:

- The output is a tool-call attempt when, after leading whitespace, it starts with `<|python_tag|>`
  or `{`. Anything else is content, streamed as it arrives.
- A call is one JSON object with a string "name", an object under exactly one of "parameters" /
  "arguments", and at most a "type" of "function" besides. Calls may be separated by whitespace and
  one `;`. Objects are delimited by a JSON scanner that knows strings and escapes, so `;`, braces
  and quotes inside arguments are safe.
- If the first call is not a valid call (malformed, truncated, or JSON that is not a call, such as
  a plain JSON answer), the whole output is content, never an error. If a later one fails, the calls
  before it stand and the rest, from where that call starts, is content.
- `arguments` is the parsed object re-serialised (`json.dumps`, non-ASCII kept), so it always parses.

With tool_choice "required" or a named function the output is constrained (`tool_call_format`,
runtime/structured_output.py) to calls in exactly this form, `{"name": "N", "parameters": {...}}`
with arguments that match the function's JSON schema, several joined by "; " when
parallel_tool_calls allows, so that they always parse.

The streaming parser gives the same result as `parse` however the text is split. To keep that
promise and never stream arguments that later turn out broken, a call is emitted when its object is
complete: the header delta (id, name) and then its arguments in one piece. Content is not held
back, except leading whitespace and a partial `<|python_tag|>` until they are decided.
"""
from __future__ import annotations

import json
import secrets
import string
from collections.abc import Mapping
from typing import Any

from llama_aot.runtime import structured_output as so
from llama_aot.serve.chat_template import RequestError

PYTHON_TAG = "<|python_tag|>"
CALL_SEPARATOR = "; "
_WS = " \t\n\r"
_ID_ALPHABET = string.ascii_letters + string.digits
_CALL_KEYS = {"name", "parameters", "arguments", "type"}
_NAME_CHARS = set(_ID_ALPHABET + "_-")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# Python's json reads NaN and Infinity; other clients' parsers do not, so they make a call invalid.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def new_tool_call_id() -> str:
    """An id in OpenAI's style ("call_" + 24 alphanumerics), unique enough to key tool results."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def _as_call(obj: Any) -> dict | None:
    """The OpenAI tool call an object denotes, or None if it is not a call."""
    if not isinstance(obj, dict) or not set(obj) <= _CALL_KEYS or obj.get("type", "function") != "function":
        return None
    name, args = obj.get("name"), [obj[k] for k in ("parameters", "arguments") if k in obj]
    if not isinstance(name, str) or not name or len(args) != 1 or not isinstance(args[0], dict):
        return None
    return {"id": new_tool_call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(args[0], ensure_ascii=False)}}


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _call_region_start(text: str) -> int | None:
    """Where the calls begin, or None when the output is not a tool-call attempt."""
    pos = _skip_ws(text, 0)
    if text.startswith(PYTHON_TAG, pos):
        return pos + len(PYTHON_TAG)
    return pos if text.startswith("{", pos) else None


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a complete model output; content is None when there is none."""
    pos = _call_region_start(text)
    if pos is None:
        return (text or None), []
    calls = []
    while True:
        pos = _skip_ws(text, pos)
        if calls and text.startswith(";", pos):
            pos = _skip_ws(text, pos + 1)
        if pos == len(text):
            return (None, calls) if calls else (text, [])
        call = None
        if text[pos] == "{":
            try:
                obj, end = _DECODER.raw_decode(text, pos)
                call = _as_call(obj)
            except (ValueError, RecursionError):
                pass
        if call is None:
            return (text[pos:], calls) if calls else (text, [])
        calls.append(call)
        pos = end


class _ObjectScanner:
    """Finds where a JSON object ends, one character at a time, without parsing values.

    It tracks strings (with escapes) and the stack of open brackets, and reports an error only
    where no JSON could continue (a closing bracket of the wrong kind, or an object member that
    does not start with a key), so it never rejects what `json` accepts. Whether the completed
    object is valid JSON is then the decoder's decision.
    """

    def __init__(self):
        self.stack: list[str] = []
        self.in_string = self.escaped = False
        self.expect_key = False

    def feed(self, ch: str) -> str:
        """'more', 'done' (this character closed the object) or 'error'."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
            return "more"
        if self.expect_key and ch not in _WS:
            self.expect_key = False
            if ch not in '"}':
                return "error"
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.stack.append("}" if ch == "{" else "]")
            self.expect_key = ch == "{"
        elif ch in "}]":
            if not self.stack or self.stack.pop() != ch:
                return "error"
            if not self.stack:
                return "done"
        elif ch == "," and self.stack and self.stack[-1] == "}":
            self.expect_key = True
        return "more"


class StreamingToolParser:
    """Incremental `parse`: feed text deltas, get OpenAI chat.completion.chunk `delta` dicts.

    Events are `{"content": str}` and `{"tool_calls": [item]}`, where a call's first item is
    `{"index", "id", "type": "function", "function": {"name", "arguments": ""}}` and its second
    `{"index", "function": {"arguments": str}}`. Call `finish()` once at the end of generation.
    """

    _START, _CONTENT, _CALL, _BETWEEN = range(4)

    def __init__(self):
        self._state = self._START
        self._text = ""          # everything fed so far
        self._call_start = 0     # where the current call's object begins
        self._scanner: _ObjectScanner | None = None
        self._separated = False  # a ';' was seen since the last call
        self.tool_calls: list[dict] = []

    def feed(self, delta: str) -> list[dict]:
        if self._state == self._CONTENT:
            return [{"content": delta}] if delta else []
        events: list[dict] = []
        start = len(self._text)
        self._text += delta
        for i in range(start, len(self._text)):
            self._step(i, events)
            if self._state == self._CONTENT:  # the fallback emitted everything up to the end
                break
        return events

    def finish(self) -> list[dict]:
        events: list[dict] = []
        undecided = self._state in (self._START, self._CALL)
        if undecided or (self._state == self._BETWEEN and not self.tool_calls):
            self._fall_back(events)
        return [e for e in events if e.get("content") != ""]

    def _step(self, i: int, events: list[dict]) -> None:
        ch = self._text[i]
        if self._state == self._START:
            head = self._text[_skip_ws(self._text, 0):i + 1]
            if head == "{":
                self._open_call(i)
            elif head == PYTHON_TAG:
                self._state = self._BETWEEN
            elif head and not PYTHON_TAG.startswith(head):
                self._fall_back(events)
        elif self._state == self._CALL:
            status = self._scanner.feed(ch)
            if status == "done":
                self._close_call(i, events)
            elif status == "error":
                self._fall_back(events)
        elif ch not in _WS:  # _BETWEEN: before the first call after the tag, or after a call
            if ch == ";" and self.tool_calls and not self._separated:
                self._separated = True
            elif ch == "{":
                self._open_call(i)
            else:
                self._call_start = i
                self._fall_back(events)

    def _open_call(self, i: int) -> None:
        self._state, self._call_start, self._scanner = self._CALL, i, _ObjectScanner()
        self._scanner.feed("{")

    def _close_call(self, i: int, events: list[dict]) -> None:
        try:
            call = _as_call(_DECODER.decode(self._text[self._call_start:i + 1]))
        except (ValueError, RecursionError):
            call = None
        if call is None:
            self._fall_back(events)
            return
        index = len(self.tool_calls)
        self.tool_calls.append(call)
        function = call["function"]
        events.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": function["name"], "arguments": ""}}]})
        events.append({"tool_calls": [{"index": index, "function": {"arguments": function["arguments"]}}]})
        self._state, self._separated = self._BETWEEN, False

    def _fall_back(self, events: list[dict]) -> None:
        """Not (or no longer) a call: everything from the failed call on is content; with no call
        yet, that is the whole output."""
        start = self._call_start if self.tool_calls else 0
        self._state = self._CONTENT
        events.append({"content": self._text[start:]})


def _tool_name(tool: Any, i: int) -> str:
    where = f"tools[{i}]"
    if not isinstance(tool, Mapping):
        raise RequestError(f"{where} must be an object like {{\"type\": \"function\", \"function\": {{...}}}}", where)
    if tool.get("type") != "function":
        raise RequestError(f"{where}.type must be 'function', got {tool.get('type')!r}", f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise RequestError(f"{where}.function must be an object with a name", f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 64 or not set(name) <= _NAME_CHARS:
        raise RequestError(f"{where}.function.name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -, "
                           f"got {name!r}", f"{where}.function.name")
    if not isinstance(function.get("description", ""), str):
        raise RequestError(f"{where}.function.description must be a string", f"{where}.function.description")
    if not isinstance(function.get("parameters", {}), Mapping):
        raise RequestError(f"{where}.function.parameters must be a JSON Schema object",
                           f"{where}.function.parameters")
    return name


def call_opening(name: str) -> str:
    """The text of a call up to its arguments, as Llama 3.1 writes it."""
    return '{"name": "%s", "parameters": ' % name


def tool_call_format(tools: list, parallel: bool) -> so.TaggedJson:
    """The calls the model may make to `tools` (validated by `tools_for_choice`): one, or with
    `parallel` one or more joined by CALL_SEPARATOR, each with arguments that match its schema
    (any object where the function declares none)."""
    tags = tuple(so.Tag(call_opening(t["function"]["name"]),
                        so.canonical(t["function"].get("parameters") or {"type": "object"}), "}") for t in tools)
    return so.TaggedJson(tags, CALL_SEPARATOR, parallel)


def tools_for_choice(tools: list | None, tool_choice: Any) -> tuple[list | None, str | None]:
    """Validate `tools` and `tool_choice`; return (tools to render in the prompt, forced name).

    - no tools (None or []) with tool_choice absent or "none": (None, None);
    - "none": (None, None). The tools are left out of the prompt: shown them, Llama answers with a
      call that would then have to be passed off as content;
    - absent or "auto", and "required": (tools, None); the server enforces "required";
    - {"type": "function", "function": {"name": N}}: ([that tool], N). Only the forced tool is
      rendered, since the model may call no other.
    Raises RequestError with OpenAI's `param` for malformed tools, duplicate names, an unknown
    choice, or a named tool that is not in `tools`.
    """
    if tools is not None and not isinstance(tools, list):
        raise RequestError("tools must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    tools = tools or None
    names = [_tool_name(t, i) for i, t in enumerate(tools or [])]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RequestError(f"tools[{i}].function.name {name!r} repeats tools[{names.index(name)}]'s; "
                               "tool names must be unique", f"tools[{i}].function.name")
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return None, None
    if not tools:
        raise RequestError("tool_choice is only allowed when tools are given", "tool_choice")
    if tool_choice in ("auto", "required"):
        return tools, None
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), Mapping):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise RequestError(f"tool_choice names the function {name!r}, which is not among the tools "
                               f"({', '.join(names)})", "tool_choice.function.name")
        return [tools[names.index(name)]], name
    raise RequestError("tool_choice must be 'none', 'auto', 'required' or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
