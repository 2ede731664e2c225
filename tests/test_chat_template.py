"""Chat templates: prompt tokens against Meta's Llama 3 chat format and transformers' renderer.

Oracles: `llama_models.llama3.chat_format.ChatFormat` with Meta's tiktoken `Tokenizer` (prompt
tokens), transformers' `apply_chat_template` on the same checkpoint directory (text and tokens),
for the tiny Llama 3.1 checkpoint and for SmolLM2's ChatML.

How the Meta comparison is made. Meta's ChatFormat encodes messages as given: a header per message,
the content, <|eot_id|>, and the assistant header at the end. It writes no system preamble and no
tool instructions. Meta wrote those with prompt generators (llama-models' source tree,
models/llama3/prompt_templates/system_prompts.py), which the installed 0.3.0 wheel does not ship
and whose text differs from the template's: today's date as "%d %B %Y", and custom tools introduced
by "Answer the user's question by making use of the following functions if needed..." with a
hand-built JSON of Meta's ToolParamDefinition (properties as a list) rather than OpenAI's JSON
Schema. No rendering of OpenAI tools can equal that text, so the oracle is the checkpoint's own
template text, which is what the model ships with and what transformers and vLLM render. Meta's
message list holds the same conversation with the template's added text spelled out:
- the system message starts with the template's preamble, "Cutting Knowledge Date: December 2023\\n
  Today Date: 26 Jul 2024\\n\\n" ("Environment: ipython\\n" first when tools are given), and it is
  present even when the conversation has none, because the template always writes one;
- with tools, the first user message starts with the template's instruction paragraph and each
  tool as `json.dumps(tool, indent=4)` plus a blank line: where the HF template puts tools by default;
- an assistant tool call is Meta's content `{"name": ..., "parameters": ...}`, the form the template
  writes. Meta's own ToolCall encoding adds `"type": "function", ` in front of "name";
  `test_meta_tool_call_encoding_differs_only_by_type_key` pins that exact difference;
- a tool result is role "tool" (Meta writes the "ipython" header for it) whose content is the
  result JSON-quoted: the template applies `tojson` to it, because a jinja string "is iterable".
Everything else (headers, <|eot_id|>, trimming, where bos goes, and the BPE of every piece) is
compared token for token.
"""
from __future__ import annotations

import json
import shutil

import pytest

from llama31_checkpoint import (BOS_ID, LLAMA31_CHAT_TEMPLATE, meta_tokenizer_path,
                                write_llama31_checkpoint)
from llama_aot.serve.chat_template import ChatTemplate, RequestError, load_chat_template

PREAMBLE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
TOOL_INSTRUCTIONS = ("Given the following functions, please respond with a JSON for a function call with its "
                     "proper arguments that best answers the given prompt.\n\nRespond in the format "
                     '{"name": function name, "parameters": dictionary of argument name and its value}.'
                     "Do not use variables.\n\n")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current température in a city (°C).",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. \"Paris\""}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}}}}}
TOOLS = [WEATHER, SEARCH]
CALL_ARGS = {"city": "Paris", "units": {"temp": "C", "nested": [1, 2.5, None, True]}}
TOOL_RESULT = '{"temperature": 22, "sky": "clear; no clouds"}'


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    return write_llama31_checkpoint(tmp_path_factory.mktemp("llama31") / "tiny-llama31-instruct")


@pytest.fixture(scope="module")
def template(llama31):
    return load_chat_template(llama31)


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    return ChatFormat(Tokenizer(meta_tokenizer_path()))


@pytest.fixture(scope="module")
def hf_llama31(llama31):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama31))


def meta_tokens(meta, messages) -> list[int]:
    from llama_models.datatypes import RawMessage, StopReason

    raw = [RawMessage(role=m["role"], content=m["content"],
                      stop_reason=StopReason.end_of_turn if m["role"] == "assistant" else None)
           for m in messages]
    return meta.encode_dialog_prompt(raw).tokens


def hf_tokens(tok, messages, **kwargs) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def tool_block(tools) -> str:
    return "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)


def tool_call(name, args, call_id="call_1"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


# Each case: (OpenAI request messages, tools, Meta's messages for the same conversation).
CASES = {
    "user_only": (
        [{"role": "user", "content": "What is the capital of France?"}], None,
        [{"role": "system", "content": PREAMBLE},
         {"role": "user", "content": "What is the capital of France?"}]),
    "system_prompt": (
        [{"role": "system", "content": "You are a terse assistant."},
         {"role": "user", "content": "Say hi in three languages: héllo, 你好, 🙂."}], None,
        [{"role": "system", "content": PREAMBLE + "You are a terse assistant."},
         {"role": "user", "content": "Say hi in three languages: héllo, 你好, 🙂."}]),
    "multi_turn": (
        [{"role": "system", "content": "  You answer in one line.\n"},
         {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"},
         {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "3*3?  "}]}],
        None,
        [{"role": "system", "content": PREAMBLE + "You answer in one line."},
         {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And\n3*3?"}]),
    "tools": (
        [{"role": "system", "content": "You can call functions."},
         {"role": "user", "content": "Weather in Paris?"}], TOOLS,
        [{"role": "system", "content": "Environment: ipython\n" + PREAMBLE + "You can call functions."},
         {"role": "user", "content": TOOL_INSTRUCTIONS + tool_block(TOOLS) + "Weather in Paris?"}]),
    "tool_call_and_result": (
        [{"role": "system", "content": "You can call functions."},
         {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [tool_call("get_weather", CALL_ARGS)]},
         {"role": "tool", "tool_call_id": "call_1", "content": TOOL_RESULT}], TOOLS,
        [{"role": "system", "content": "Environment: ipython\n" + PREAMBLE + "You can call functions."},
         {"role": "user", "content": TOOL_INSTRUCTIONS + tool_block(TOOLS) + "Weather in Paris?"},
         {"role": "assistant", "content": '{"name": "get_weather", "parameters": ' + json.dumps(CALL_ARGS) + "}"},
         {"role": "tool", "content": json.dumps(TOOL_RESULT)}]),
    "tool_result_then_answer": (
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "tool_calls": [tool_call("get_weather", {"city": "Paris"})]},
         {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "22"}]},
         {"role": "assistant", "content": "It is 22 °C."},
         {"role": "user", "content": "Thanks!"}], [WEATHER],
        [{"role": "system", "content": "Environment: ipython\n" + PREAMBLE},
         {"role": "user", "content": TOOL_INSTRUCTIONS + tool_block([WEATHER]) + "Weather in Paris?"},
         {"role": "assistant", "content": '{"name": "get_weather", "parameters": {"city": "Paris"}}'},
         {"role": "tool", "content": '"22"'},
         {"role": "assistant", "content": "It is 22 °C."},
         {"role": "user", "content": "Thanks!"}]),
}


def as_transformers_input(messages):
    """The same request as transformers takes it: text parts flattened, arguments as dicts."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


# ------------------------------------------------------------------------------ the tokenizer


TEXTS = [
    "Hello world!", "  leading spaces,\ttabs\tand\nnewlines\r\n\r\n  ", "I'm sure they'LL say DON'T, you'd've",
    "Numbers: 1 12 123 1234 12345678901234567890 3.14159 -42",
    "Unicode: héllo wörld 你好世界 こんにちは 🙂🚀 Ωμέγα",
    "def f(x):\n    return {\"a\": [x ** 2, 'b']}  # comment\n\n\n", "a" * 300 + " " * 40 + "b",
    '{"name": "get_weather", "parameters": {"city": "Paris"}}', "<|eot_id|> written as text",
    "\u00a0non-breaking\u2003em-space\u200bzero-width", "🏳️‍🌈 family: 👨‍👩‍👧‍👦",
]


def test_llama31_checkpoint_files(llama31):
    import torch
    from transformers import LlamaForCausalLM

    config = json.loads((llama31 / "config.json").read_text())
    assert config["eos_token_id"] == [128001, 128008, 128009] and config["vocab_size"] == 128256
    assert json.loads((llama31 / "generation_config.json").read_text())["eos_token_id"] == [128001, 128008, 128009]
    assert json.loads((llama31 / "tokenizer_config.json").read_text())["chat_template"] == LLAMA31_CHAT_TEMPLATE
    assert (llama31 / "model.safetensors").stat().st_size < 40 << 20
    model = LlamaForCausalLM.from_pretrained(str(llama31))
    assert model.config.rope_parameters["rope_type"] == "llama3" and model.config.num_key_value_heads == 2
    assert model.dtype == torch.bfloat16
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # untied, as in 3.1 8B


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_meta(template, meta, text):
    ours = template.tokenizer.encode(text, add_special_tokens=False).ids
    assert ours == meta.tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
    assert template.tokenizer.decode(ours, skip_special_tokens=False) == text


def test_tokenizer_special_ids_and_bos_post_processor(template, meta):
    tok = template.tokenizer
    assert tok.get_vocab_size() == 128256
    for name, token_id in meta.tokenizer.special_tokens.items():
        assert tok.token_to_id(name) == token_id
    assert tok.encode("hi").ids == [BOS_ID] + tok.encode("hi", add_special_tokens=False).ids
    ids = template.encode([{"role": "user", "content": "hi"}])
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1


# ------------------------------------------------------------------------- Llama 3.1 vs Meta


@pytest.mark.parametrize("case", list(CASES))
def test_llama31_prompt_tokens_equal_meta(template, meta, case):
    messages, tools, meta_messages = CASES[case]
    assert template.encode(messages, tools=tools) == meta_tokens(meta, meta_messages)


@pytest.mark.parametrize("case", list(CASES))
def test_llama31_render_equals_transformers(template, hf_llama31, case):
    messages, tools, _ = CASES[case]
    hf_messages = as_transformers_input(messages)
    for add_generation_prompt in (True, False):
        expected = hf_llama31.apply_chat_template(hf_messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        assert template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt) == expected
    assert template.encode(messages, tools=tools) == hf_tokens(hf_llama31, hf_messages, tools=tools,
                                                               add_generation_prompt=True)


def test_meta_tool_call_encoding_differs_only_by_type_key(template, meta):
    """With Meta's own ToolCall, ChatFormat writes {"type": "function", "name": ..., "parameters":
    ...}; the official HF template writes the same object without "type". Nothing else differs.
    (Meta's argument type nests two levels at most, hence flatter arguments than CALL_ARGS.)"""
    from llama_models.datatypes import RawMessage, StopReason, ToolCall

    args = {"city": "Paris", "days": [1, 2], "units": {"temp": "C"}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "tool_calls": [tool_call("get_weather", args)]}]
    raw = [RawMessage(role="system", content="Environment: ipython\n" + PREAMBLE),
           RawMessage(role="user", content=TOOL_INSTRUCTIONS + tool_block(TOOLS) + "Weather in Paris?"),
           RawMessage(role="assistant", content="", stop_reason=StopReason.end_of_turn,
                      tool_calls=[ToolCall(call_id="call_1", tool_name="get_weather", arguments=args)])]
    meta_text = meta.tokenizer.decode(meta.encode_dialog_prompt(raw).tokens)
    ours = template.render(messages, tools=TOOLS)
    assert meta_text != ours
    assert meta_text == ours.replace('{"name": "get_weather"', '{"type": "function", "name": "get_weather"')


def test_llama31_date_string_and_kwargs(template):
    messages = [{"role": "user", "content": "hi"}]
    assert "Today Date: 26 Jul 2024\n" in template.render(messages)
    assert "Today Date: 01 Jan 2026\n" in template.render(messages, date_string="01 Jan 2026")
    in_system = template.render(messages, tools=[WEATHER], tools_in_user_message=False)
    assert in_system.index("You have access to the following functions") < in_system.index("<|eot_id|>")
    with pytest.raises(RequestError) as err:
        template.render(messages, documents=[])
    assert err.value.param == "chat_template_kwargs"


# ---------------------------------------------------------------------------------- SmolLM2


SMOL_CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Where is the gold?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3*3? Ünïcödé ✓"}],
    [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}],
]


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    from transformers import AutoTokenizer

    return load_chat_template(smollm2_checkpoint), AutoTokenizer.from_pretrained(str(smollm2_checkpoint))


@pytest.mark.parametrize("index", range(len(SMOL_CONVERSATIONS)))
def test_smollm2_chatml_equals_transformers(smollm2, index):
    ours, hf = smollm2
    messages = SMOL_CONVERSATIONS[index]
    hf_messages = as_transformers_input(messages)
    for add_generation_prompt in (True, False):
        expected = hf.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.render(messages, add_generation_prompt=add_generation_prompt) == expected
        assert ours.encode(messages, add_generation_prompt=add_generation_prompt) == hf_tokens(
            hf, hf_messages, add_generation_prompt=add_generation_prompt)
    assert ours.special_tokens["bos_token"] == "<|im_start|>" and ours.special_tokens["eos_token"] == "<|im_end|>"


# ------------------------------------------------------------------------------ user errors


BAD_REQUESTS = [
    ([], "messages"),
    ([{"role": "robot", "content": "beep"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
     "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": 42}], "messages[0].content"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None}], "messages[1].content"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], "messages[1].tool_call_id"),
    ([{"role": "user", "content": "q", "tool_calls": [tool_call("f", {})]}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"arguments": "{}"}}]}],
     "messages[0].tool_calls[0].function.name"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                            "function": {"name": "f", "arguments": "{\"a\": 1"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                            "function": {"name": "f", "arguments": "[1, 2]"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "code", "function": {"name": "f"}}]}],
     "messages[0].tool_calls[0].type"),
]


@pytest.mark.parametrize("messages,param", BAD_REQUESTS)
def test_bad_requests_raise_value_error_with_param(template, messages, param):
    with pytest.raises(ValueError) as err:
        template.render(messages)
    assert isinstance(err.value, RequestError) and err.value.param == param
    assert str(err.value)


def test_template_raise_exception_becomes_request_error(template):
    two_calls = [{"role": "user", "content": "q"},
                 {"role": "assistant", "tool_calls": [tool_call("a", {}, "c1"), tool_call("b", {}, "c2")]}]
    with pytest.raises(RequestError, match="only supports single tool-calls") as err:
        template.render(two_calls, tools=TOOLS)
    assert err.value.param == "messages"
    with pytest.raises(RequestError, match="no first user message"):
        template.render([{"role": "system", "content": "s"}], tools=TOOLS)


# ------------------------------------------------------------------- the jinja environment


def test_environment_helpers_and_sandbox(template):
    tok = template.tokenizer
    msgs = [{"role": "user", "content": "x"}]
    render = lambda source, **kw: ChatTemplate(source, tok).render(msgs, **kw)  # noqa: E731
    assert render("{{ {'k': 'é', 'n': [1]} | tojson }}") == '{"k": "é", "n": [1]}'
    assert render("{{ {'k': 1} | tojson(indent=2) }}") == '{\n  "k": 1\n}'
    assert render("{{ '<&>' | tojson }}") == '"<&>"'
    assert len(render("{{ strftime_now('%Y-%m-%d') }}")) == 10
    assert render("{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{% endfor %}ok") == "ok"
    assert render("{% generation %}{{ messages[0].content }}{% endgeneration %}") == "x"
    assert render("  {% if true %}\n  a\n  {% endif %}\n") == "  a\n"  # trim_blocks + lstrip_blocks
    assert render("{{ bos_token }}|{{ eos_token }}") == "|"
    with pytest.raises(RequestError, match="boom"):
        render("{{ raise_exception('boom') }}")
    with pytest.raises(RequestError):
        render("{{ messages.__class__.__mro__ }}")
    with pytest.raises(RequestError):
        render("{% set _ = messages.append(1) %}")  # immutable sandbox
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% if %}", tok)


def test_load_chat_template_sources(llama31, tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "named"
    d.mkdir()
    shutil.copy(llama31 / "tokenizer.json", d)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True},
        "eos_token": "<|eot_id|>",
        "chat_template": [{"name": "default", "template": "D{{ bos_token }}{{ eos_token }}"},
                          {"name": "tool_use", "template": "T{{ tools | length }}"}]}))
    named = load_chat_template(d)
    msgs = [{"role": "user", "content": "x"}]
    assert named.render(msgs) == "D<|begin_of_text|><|eot_id|>"
    assert named.render(msgs, tools=[WEATHER]) == "T1"
    assert named.render(msgs) == AutoTokenizer.from_pretrained(str(d)).apply_chat_template(msgs, tokenize=False)
    (d / "chat_template.jinja").write_text("J{{ messages | length }}")  # the file wins, as in transformers
    assert load_chat_template(d).render(msgs) == "J1"
    (d / "chat_template.jinja").unlink()
    (d / "tokenizer_config.json").write_text("{}")
    assert load_chat_template(d) is None  # a base model: served for /v1/completions only


def test_fixture_template_is_the_official_one():
    """Spot checks that the fixture is Llama 3.1's tool-calling template, not the 3.2 variant."""
    assert LLAMA31_CHAT_TEMPLATE.startswith("{{- bos_token }}\n{%- if custom_tools is defined %}")
    assert '{%- set date_string = "26 Jul 2024" %}' in LLAMA31_CHAT_TEMPLATE
    assert "strftime_now" not in LLAMA31_CHAT_TEMPLATE
    assert len(LLAMA31_CHAT_TEMPLATE) == 4614
