"""The llama3 tool-call parser, streaming and not, and tool_choice validation.

The table gives model outputs and what they mean. Streaming is checked against `parse` for every
entry split at every character boundary, one character at a time, and in random chunks, plus a fuzz
of JSON-ish strings, since the contract is that the way text arrives never changes the result.
"""
from __future__ import annotations

import json
import random

import pytest

from llama_aot.serve.chat_template import RequestError
from llama_aot.serve.tool_parser import PYTHON_TAG, StreamingToolParser, parse, tools_for_choice

T = PYTHON_TAG
A = '{"name": "a", "parameters": {}}'
B = '{"name": "b", "parameters": {"x": 1}}'
META_PRETTY = ('{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n'
               '        "n": "10",\n        "genre": "all"\n    }\n}')
TRICKY = r'{"name": "f", "parameters": {"q": "say \"hi\"; {ok} [x] \\", "s": "]}[{;", "t": "<|python_tag|>\n"}}'
NESTED = {"filter": {"and": [{"field": "age", "gte": 21}, {"or": [{"tag": "a"}, {"tag": ["b", {"deep": None}]}]}]},
          "limit": 10, "ratio": -1.5e-3, "flags": [True, False], "empty": {}, "list": []}

# (model output, expected content, expected [(name, arguments as a dict)])
TABLE = {
    "single": ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
               [("get_weather", {"city": "Paris"})]),
    "single_python_tag": (T + '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
                          [("get_weather", {"city": "Paris"})]),
    "arguments_key": ('{"name": "search", "arguments": {"query": "llamas", "top_k": 3}}', None,
                      [("search", {"query": "llamas", "top_k": 3})]),
    "two_calls": (A + "; " + B, None, [("a", {}), ("b", {"x": 1})]),
    "two_calls_tag_compact": (T + '{"name":"a","parameters":{}};{"name":"b","arguments":{"x":[1,2]}}', None,
                              [("a", {}), ("b", {"x": [1, 2]})]),
    "three_calls_newlines": (A + "\n" + B + " ;\n " + A, None, [("a", {}), ("b", {"x": 1}), ("a", {})]),
    "meta_pretty_with_type": (T + META_PRETTY, None, [("trending_songs", {"n": "10", "genre": "all"})]),
    "nested": (json.dumps({"name": "query_db", "parameters": NESTED}), None, [("query_db", NESTED)]),
    "special_characters": (TRICKY, None,
                           [("f", {"q": 'say "hi"; {ok} [x] \\', "s": "]}[{;", "t": "<|python_tag|>\n"})]),
    "odd_escaped_quote": (r'{"name": "f", "parameters": {"q": "a \"} b \\\" c"}}', None,
                          [("f", {"q": 'a "} b \\" c'})]),
    "unicode": ('{"name": "translate", "parameters": {"text": "naïve café 你好 \\u00e9 🙂"}}', None,
                [("translate", {"text": "naïve café 你好 é 🙂"})]),
    "leading_whitespace": (" \n\t" + A, None, [("a", {})]),
    "whitespace_around_tag": ("  " + T + " \n " + A, None, [("a", {})]),
    "trailing_separator": (A + " ; \n", None, [("a", {})]),
    "plain_text": ("The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    "plain_text_leading_space": ("  Hello!\n", "  Hello!\n", []),
    "html_text": ("<b>bold</b> text", "<b>bold</b> text", []),
    "almost_tag": ("<|python|> no", "<|python|> no", []),
    "call_mid_text": ("Sure: " + A, "Sure: " + A, []),
    "empty": ("", None, []),
    "whitespace_only": (" \n ", " \n ", []),
    "tag_only": (T, T, []),
    "tag_then_code": (T + 'print("hi")', T + 'print("hi")', []),
    "truncated_call": ('{"name": "a", "parameters": {"city": "Par', '{"name": "a", "parameters": {"city": "Par', []),
    "unquoted_value": ('{"name": "a", "parameters": {"city": Paris}}',
                       '{"name": "a", "parameters": {"city": Paris}}', []),
    "trailing_comma": ('{"name": "a", "parameters": {"x": 1,}}', '{"name": "a", "parameters": {"x": 1,}}', []),
    "not_json_braces": ("{hello world}", "{hello world}", []),
    "empty_object": ("{}", "{}", []),
    "json_answer": ('{"answer": 42}', '{"answer": 42}', []),
    "name_plus_other_keys": ('{"name": "Alice", "age": 3, "parameters": {}}',
                             '{"name": "Alice", "age": 3, "parameters": {}}', []),
    "parameters_not_object": ('{"name": "a", "parameters": "x=1"}', '{"name": "a", "parameters": "x=1"}', []),
    "both_argument_keys": ('{"name": "a", "parameters": {}, "arguments": {}}',
                           '{"name": "a", "parameters": {}, "arguments": {}}', []),
    "wrong_type": ('{"type": "tool", "name": "a", "parameters": {}}',
                   '{"type": "tool", "name": "a", "parameters": {}}', []),
    "empty_name": ('{"name": "", "parameters": {}}', '{"name": "", "parameters": {}}', []),
    "nan_argument": ('{"name": "a", "parameters": {"x": NaN}}', '{"name": "a", "parameters": {"x": NaN}}', []),
    "mismatched_bracket": ('{"name": "a", "parameters": {"x": [1}]}', '{"name": "a", "parameters": {"x": [1}]}', []),
    "call_then_text": (A + "; oops, not JSON", "oops, not JSON", [("a", {})]),
    "call_then_text_no_separator": (A + " Done.", "Done.", [("a", {})]),
    "call_then_truncated_call": (A + '; {"name": "b", "parameters": {', '{"name": "b", "parameters": {', [("a", {})]),
    "call_then_invalid_call": (A + ';{"answer": 1}', '{"answer": 1}', [("a", {})]),
    "double_separator": (A + ";;" + B, ";" + B, [("a", {})]),
    "separator_after_tag": (T + ";" + A, T + ";" + A, []),
    "deep_nesting": ('{"name": "d", "parameters": ' + '{"k": ' * 40 + "1" + "}" * 40 + "}", None,
                     [("d", json.loads('{"k": ' * 40 + "1" + "}" * 40))]),
}


def summary(content, calls):
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def reassemble(events):
    """The (content, calls) a client rebuilds from the deltas, checking their OpenAI shape."""
    content, calls = None, {}
    for event in events:
        assert len(event) == 1 and set(event) <= {"content", "tool_calls"}, event
        if "content" in event:
            assert isinstance(event["content"], str) and event["content"]
            content = (content or "") + event["content"]
            continue
        (item,) = event["tool_calls"]
        index = item["index"]
        if index not in calls:
            assert index == len(calls) and item["type"] == "function" and item["id"].startswith("call_")
            assert set(item) == {"index", "id", "type", "function"} and item["function"]["arguments"] == ""
            calls[index] = {"id": item["id"], "type": "function",
                            "function": {"name": item["function"]["name"], "arguments": ""}}
        else:
            assert set(item) == {"index", "function"} and set(item["function"]) == {"arguments"}
            calls[index]["function"]["arguments"] += item["function"]["arguments"]
    return content, [calls[i] for i in range(len(calls))]


def stream(chunks):
    parser = StreamingToolParser()
    events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.finish()
    content, calls = reassemble(events)
    assert [c["function"] for c in calls] == [c["function"] for c in parser.tool_calls]
    return content, calls


def random_chunks(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, min(8, len(text) - 1)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("case", list(TABLE))
def test_parse(case):
    text, content, calls = TABLE[case]
    got_content, got_calls = parse(text)
    assert summary(got_content, got_calls) == (content, calls)
    for call in got_calls:
        assert set(call) == {"id", "type", "function"} and call["type"] == "function"
        assert call["id"].startswith("call_") and len(call["id"]) == 29
        assert json.loads(call["function"]["arguments"]) is not None
    assert len({c["id"] for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("case", list(TABLE))
def test_streaming_equals_parse_however_split(case):
    text = TABLE[case][0]
    expected = summary(*parse(text))
    assert summary(*stream([text])) == expected
    assert summary(*stream(list(text))) == expected
    for k in range(len(text) + 1):
        assert summary(*stream([text[:k], text[k:]])) == expected, k
    rng = random.Random(case)
    for _ in range(25):
        assert summary(*stream(random_chunks(text, rng))) == expected


def test_arguments_are_compact_json_of_what_the_model_wrote():
    _, (call,) = parse(T + META_PRETTY)
    assert call["function"]["arguments"] == '{"n": "10", "genre": "all"}'
    _, (call,) = parse(TABLE["unicode"][0])
    assert call["function"]["arguments"] == '{"text": "naïve café 你好 é 🙂"}'


def test_streaming_is_prompt():
    parser = StreamingToolParser()
    assert parser.feed("Hello") == [{"content": "Hello"}]
    assert parser.feed(" world") == [{"content": " world"}]
    assert parser.finish() == []

    parser = StreamingToolParser()
    assert parser.feed(" \n") == []  # undecided: may precede a call
    assert parser.feed("<|pyt") == []
    assert parser.feed("x") == [{"content": " \n<|pytx"}]

    parser = StreamingToolParser()
    assert parser.feed(T + '{"name": "a", "parameters": {"s": "}"') == []
    first, second = parser.feed("}}")
    assert first["tool_calls"][0]["function"] == {"name": "a", "arguments": ""}
    assert second == {"tool_calls": [{"index": 0, "function": {"arguments": '{"s": "}"}'}}]}
    assert parser.feed(" ; ") == []
    assert parser.feed("Done") == [{"content": "Done"}]
    assert parser.feed("!") == [{"content": "!"}]
    assert parser.finish() == []
    assert [c["function"]["name"] for c in parser.tool_calls] == ["a"]

    parser = StreamingToolParser()
    assert parser.feed("{hello") == [{"content": "{hello"}]  # no JSON object starts like this


ALPHABET = ["{", "}", "[", "]", '"', ":", ",", ";", " ", "\n", "\\", "x", "1", "null", "NaN", '"name"', '"a"',
            '"parameters"', '"arguments"', '"type"', '"function"', T, A, B, "<|", '"na', "me"]


def test_fuzz_streaming_equals_parse():
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 14)))
        if rng.random() < 0.5:
            text = rng.choice([A, T + A, A + ";", T]) + text
        expected = summary(*parse(text))
        assert summary(*stream(list(text))) == expected, text
        assert summary(*stream(random_chunks(text, rng))) == expected, text


# -------------------------------------------------------------------------------- tool_choice


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                            "parameters": {"type": "object", "properties": {}}}}
CLOCK = {"type": "function", "function": {"name": "now"}}


def test_tools_for_choice():
    tools = [WEATHER, CLOCK]
    assert tools_for_choice(None, None) == (None, None)
    assert tools_for_choice([], None) == (None, None)
    assert tools_for_choice(None, "none") == (None, None)
    assert tools_for_choice(tools, None) == (tools, None)
    assert tools_for_choice(tools, "auto") == (tools, None)
    assert tools_for_choice(tools, "required") == (tools, None)
    assert tools_for_choice(tools, "none") == (None, None)
    assert tools_for_choice(tools, {"type": "function", "function": {"name": "now"}}) == ([CLOCK], "now")


BAD_TOOLS = [
    ({"type": "function"}, "tools", None),
    ([WEATHER, "now"], "tools[1]", None),
    ([{"type": "code", "function": {"name": "f"}}], "tools[0].type", None),
    ([{"type": "function"}], "tools[0].function", None),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name", None),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name", None),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name", None),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description", None),
    ([{"type": "function", "function": {"name": "f", "parameters": "object"}}], "tools[0].function.parameters", None),
    ([WEATHER, CLOCK, WEATHER], "tools[2].function.name", None),
    ([WEATHER], "tool_choice", "sometimes"),
    ([WEATHER], "tool_choice", {"type": "function"}),
    ([WEATHER], "tool_choice.function.name", {"type": "function", "function": {"name": "now"}}),
    (None, "tool_choice", "auto"),
    (None, "tool_choice", "required"),
    ([], "tool_choice", {"type": "function", "function": {"name": "now"}}),
]


@pytest.mark.parametrize("tools,param,choice", BAD_TOOLS)
def test_tools_for_choice_errors(tools, param, choice):
    with pytest.raises(ValueError) as err:
        tools_for_choice(tools, choice)
    assert isinstance(err.value, RequestError) and err.value.param == param and str(err.value)
