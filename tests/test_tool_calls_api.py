"""Tool calling through the HTTP layer, in OpenAI's shapes, read back by the stock `openai` client.

The model is scripted: a stand-in engine emits a fixed text token by token through the real
tokenizer and detokenizer, so the assertions are about the server (prompt rendering, forced
calls, parsing, streaming deltas, finish reasons), not about what a random model would say. A
request with a constraint (a forced call) also runs its script through the compiled grammar, so
a script the grammar would not let the model write fails the test.
"""
import json
import threading

import openai
import pytest
from fastapi.testclient import TestClient

from llama_aot.compiler.checkpoint import open_checkpoint
from llama_aot.runtime.detokenizer import IncrementalDetokenizer
from llama_aot.runtime.engine import EngineStats, RequestOutput
from llama_aot.runtime.structured_output import RequestGrammar, StructuredOutputs
from llama_aot.serve.app import ServeConfig, create_app
from llama_aot.serve.chat_template import load_chat_template

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


class ScriptedEngine:
    """Duck-types the Engine surface the app uses; 'generates' `script` for every request."""

    def __init__(self, tokenizer, vocab_size, eos_token_ids):
        self.tokenizer = tokenizer
        self.structured = StructuredOutputs(tokenizer, vocab_size, tuple(eos_token_ids), max_rows=1)
        self.script = ""
        self.prompts: list[list[int]] = []
        self.stats = EngineStats()
        self.runner = type("R", (), {"model_config": type("C", (), {"vocab_size": vocab_size})()})()
        self.runtime = type("R", (), {"context_length": 4096})()

    def submit(self, request_id, prompt_ids, params, sink):
        self.prompts.append(list(prompt_ids))
        ids = self.tokenizer.encode(self.script, add_special_tokens=False).ids
        if params.constraint is not None:
            grammar = RequestGrammar(params.constraint)
            assert all(grammar.accept(t) for t in ids), f"the grammar refuses {self.script!r}"
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids)

        def run():
            for i, token in enumerate(ids):
                last = i == len(ids) - 1
                sink(RequestOutput(request_id, detok.add(token), token, None, None, "stop" if last else None,
                                   len(prompt_ids), i + 1, 0))
        threading.Thread(target=run).start()

    def abort(self, request_id):
        pass


@pytest.fixture(scope="module")
def template(llama31_checkpoint):
    return load_chat_template(llama31_checkpoint)


@pytest.fixture(scope="module")
def engine(template, llama31_checkpoint):
    config = open_checkpoint(llama31_checkpoint).config
    return ScriptedEngine(template.tokenizer, config.vocab_size, config.eos_token_ids)


@pytest.fixture(scope="module")
def client(engine, template):
    app = create_app(engine, template, ServeConfig(served_model_name="llama", tool_call_parser="llama3"))
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=TestClient(app), max_retries=0)


def prompt_text(template, engine) -> str:
    return template.tokenizer.decode(engine.prompts[-1], skip_special_tokens=False)


def chat(client, engine, script, **kw):
    engine.script = script
    return client.chat.completions.create(model=kw.pop("model", "llama"), messages=kw.pop("messages", USER), **kw)


def streamed_calls(chunks):
    """Reassembles streamed tool-call deltas by index, as a client would."""
    calls, reasons, content = {}, [], ""
    for chunk in chunks:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = d.id or call["id"]
            if d.function and d.function.name:
                call["name"] = d.function.name
            call["arguments"] += (d.function.arguments or "") if d.function else ""
        if choice.finish_reason:
            reasons.append(choice.finish_reason)
    return [calls[i] for i in sorted(calls)], reasons, content


CALL = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "units": {"temp": "C"}}}'
TWO_CALLS = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "arguments": {}}'


def test_tools_are_rendered_and_a_call_is_parsed(client, engine, template):
    out = chat(client, engine, CALL, tools=[WEATHER])
    assert "get_weather" in prompt_text(template, engine)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "units": {"temp": "C"}}


@pytest.mark.parametrize("script, expected", [
    (CALL, [("get_weather", {"city": "Paris", "units": {"temp": "C"}})]),
    (TWO_CALLS, [("get_weather", {"city": "Paris"}), ("get_time", {})]),
])
def test_streamed_tool_call_deltas(client, engine, script, expected):
    calls, reasons, content = streamed_calls(chat(client, engine, script, tools=[WEATHER, TIME], stream=True))
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == expected
    assert all(c["id"] for c in calls) and len({c["id"] for c in calls}) == len(calls)
    assert reasons == ["tool_calls"] and content == ""


def test_plain_answer_with_tools_is_content(client, engine):
    out = chat(client, engine, "It is sunny in Paris.", tools=[WEATHER])
    assert out.choices[0].message.content == "It is sunny in Paris." and out.choices[0].finish_reason == "stop"
    assert not out.choices[0].message.tool_calls
    calls, reasons, content = streamed_calls(chat(client, engine, "It is sunny.", tools=[WEATHER], stream=True))
    assert (calls, reasons, content) == ([], ["stop"], "It is sunny.")


def test_named_tool_choice_forces_that_call(client, engine, template):
    out = chat(client, engine, '{"city": "Paris"}}', tools=[WEATHER, TIME],
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    prompt = prompt_text(template, engine)
    assert prompt.endswith('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": ')
    assert "get_time" not in prompt
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_required_tool_choice_starts_a_call(client, engine, template):
    calls, reasons, _ = streamed_calls(chat(client, engine, 'get_time", "parameters": {}}', tools=[WEATHER, TIME],
                                            tool_choice="required", stream=True))
    assert prompt_text(template, engine).endswith('{"name": "')
    assert [c["name"] for c in calls] == ["get_time"] and reasons == ["tool_calls"]


def test_tool_choice_none_leaves_tools_out(client, engine, template):
    out = chat(client, engine, "Fine.", tools=[WEATHER], tool_choice="none")
    assert "get_weather" not in prompt_text(template, engine)
    assert out.choices[0].message.content == "Fine." and not out.choices[0].message.tool_calls


def test_history_with_tool_calls_and_results(client, engine, template):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    out = chat(client, engine, "It is 21 degrees.", messages=history, tools=[WEATHER])
    prompt = prompt_text(template, engine)
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in prompt
    # The official template passes a string tool result through tojson, quotes included.
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n" + json.dumps('{"temp": 21}') in prompt
    assert out.choices[0].message.content == "It is 21 degrees."


def test_tool_errors_are_400(client, engine):
    for kwargs, param in [
        (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice.function.name"),
        (dict(tool_choice="required"), "tool_choice"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, engine, "x", **kwargs)
        assert e.value.body["param"] == param


def test_tools_without_a_parser_are_refused(engine, template):
    app = create_app(engine, template, ServeConfig(served_model_name="llama"))
    plain = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=TestClient(app), max_retries=0)
    with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
        chat(plain, engine, "x", tools=[WEATHER])


def test_eom_is_a_stop_token(llama31_checkpoint, template):
    eom = template.tokenizer.token_to_id("<|eom_id|>")
    assert eom == 128008 and eom in open_checkpoint(llama31_checkpoint).config.eos_token_ids


def test_base_model_without_a_chat_template_serves_completions_only(engine):
    app = create_app(engine, None, ServeConfig(served_model_name="base"))
    base = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=TestClient(app), max_retries=0)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        chat(base, engine, "x", model="base")
    engine.script = " Paris."
    assert base.completions.create(model="base", prompt="The capital of France is", max_tokens=4).choices[0].text == " Paris."
