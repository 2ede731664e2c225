"""Structured output: the request fields that ask for it (OpenAI's, SGLang's and vLLM's names), the
grammar seam (runtime/structured_output.py), the sampler's row-wise token mask, and end to end on the
embedded default model through the stock `openai` client, including the issue's acceptance:
`client.chat.completions.parse` with a Pydantic model, and 50 requests with a nested schema that
all return valid JSON for it."""
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, Field
from tokenizers import Tokenizer

from llama_aot.runtime import structured_output as so
from llama_aot.runtime.sampling import Sampler, SamplingParams, TokenMask, apply_token_mask, make_generator
from llama_aot.runtime.speculative import speculates
from llama_aot.serve.errors import APIError
from llama_aot.serve.protocol import ChatCompletionRequest, CompletionRequest
from llama_aot.serve.tool_parser import parse, tool_call_format

MODEL = "smollm2"
USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


class Pet(BaseModel):
    name: str = Field(max_length=16)
    kind: Literal["cat", "dog", "fish"]


class Person(BaseModel):
    """Nested: an object in a list in an object; bounded strings, number and list, so that a
    135M-parameter model finishes it within max_tokens."""
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    pets: list[Pet] = Field(max_length=2)


# ------------------------------------------------------------------------- the request's fields

FORMATS = [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, ("response_format", so.JsonSchema.of(None))),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
     ("response_format", so.JsonSchema.of(SCHEMA))),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": False}}},
     ("response_format", so.JsonSchema.of(SCHEMA))),
    ({"regex": "[0-9]+"}, ("regex", so.Regex("[0-9]+"))),
    ({"ebnf": 'root ::= "a"'}, ("ebnf", so.Grammar('root ::= "a"'))),
    ({"json_schema": json.dumps(SCHEMA)}, ("json_schema", so.JsonSchema.of(SCHEMA))),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     ("structured_outputs", so.JsonSchema.of(SCHEMA, compact=True))),
    ({"structured_outputs": {"json": SCHEMA, "disable_additional_properties": True}},
     ("structured_outputs", so.JsonSchema.of({**SCHEMA, "additionalProperties": False}))),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, ("structured_outputs", so.Choice(("yes", "no")))),
    ({"structured_outputs": {"json_object": True}}, ("structured_outputs", so.JsonSchema.of(None))),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar:disable-any-whitespace"},
     ("guided_json", so.JsonSchema.of(SCHEMA, compact=True))),
    ({"guided_regex": "a|b"}, ("guided_regex", so.Regex("a|b"))),
    ({"guided_choice": ["x"]}, ("guided_choice", so.Choice(("x",)))),
    ({"guided_grammar": 'start: "a"'}, ("guided_grammar", so.Grammar('start: "a"'))),
]


@pytest.mark.parametrize("fields, expected", FORMATS, ids=[json.dumps(f)[:60] for f, _ in FORMATS])
def test_each_field_name_gives_its_format_on_both_routes(fields, expected):
    for request in (ChatCompletionRequest(messages=USER, **fields), CompletionRequest(prompt="x", **fields)):
        found = request.output_format()
        assert found == (None if expected is None else (expected[1], expected[0]))


REFUSED = [
    ({"regex": "a", "ebnf": 'root ::= "a"'}, "ebnf"),
    ({"response_format": {"type": "json_object"}, "guided_json": SCHEMA}, "guided_json"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ({"json_schema": "{not json"}, "json_schema"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"json": SCHEMA, "whitespace_pattern": " ?"}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"jsn": SCHEMA}}, "structured_outputs.jsn"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
]


@pytest.mark.parametrize("fields, param", REFUSED, ids=[p for _, p in REFUSED])
def test_fields_that_cannot_be_honoured_are_400s_naming_the_field(fields, param):
    with pytest.raises(APIError) as e:
        ChatCompletionRequest(messages=USER, **fields).output_format()
    assert e.value.status == 400 and e.value.param == param and e.value.message


# ------------------------------------------------------------------------------ the grammar seam

@pytest.fixture(scope="module")
def outputs(smollm2_checkpoint):
    tokenizer = Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json"))
    return so.StructuredOutputs(tokenizer, tokenizer.get_vocab_size(), (2,), max_rows=8)


def allowed(outputs, grammar, ignore_eos=False) -> set[int]:
    mask = outputs.masks([grammar], [0], [ignore_eos])
    bits = apply_token_mask(torch.zeros(1, outputs.vocab_size), mask)[0]
    return set(torch.nonzero(bits == 0).squeeze(1).tolist())


def feed(outputs, grammar, text):
    for token in outputs.tokenizer.encode(text, add_special_tokens=False).ids:
        assert grammar.accept(token), text


def test_a_grammar_ends_with_the_stop_token_alone(outputs):
    grammar = so.RequestGrammar(outputs.compile(so.Constraint((so.JsonSchema.of(SCHEMA),))))
    first = allowed(outputs, grammar)
    assert 2 not in first and outputs.tokenizer.token_to_id("{") in first
    feed(outputs, grammar, '{"a": 12}')
    assert allowed(outputs, grammar) == {2} and grammar.accept(2) and grammar.terminated


def test_ignore_eos_drops_the_stop_token_only_while_more_may_follow(outputs):
    grammar = so.RequestGrammar(outputs.compile(so.Constraint((so.Regex("[0-9]{1,3}"),))))
    feed(outputs, grammar, "7")
    assert 2 in allowed(outputs, grammar) and 2 not in allowed(outputs, grammar, ignore_eos=True)
    feed(outputs, grammar, "89")
    assert allowed(outputs, grammar, ignore_eos=True) == {2}


def test_json_whitespace_is_bounded_and_compact_json_has_none(outputs):
    loose = so.RequestGrammar(outputs.compile(so.Constraint((so.JsonSchema.of(SCHEMA),))))
    assert loose.matcher.accept_string("{" + " " * so.MAX_JSON_WHITESPACE)
    assert not loose.matcher.accept_string(" ")
    compact = so.RequestGrammar(outputs.compile(so.Constraint((so.JsonSchema.of(SCHEMA, compact=True),))))
    assert not compact.matcher.accept_string("{ ")


@pytest.mark.parametrize("fmt, message", [
    (so.JsonSchema.of({"type": "objekt"}), 'Unsupported type "objekt"'),
    (so.Regex("a(b"), "The parenthesis is not closed"),
    (so.Grammar('root ::= "a" | b'), 'Rule "b" is not defined'),
    (so.Grammar('start: "a" | b'), "unknown name 'b'"),
])
def test_a_bad_schema_regex_or_grammar_is_a_constraint_error_with_the_reason(outputs, fmt, message):
    with pytest.raises(so.ConstraintError) as e:
        outputs.compile(so.Constraint((fmt,), param="regex"))
    assert message in str(e.value) and str(e.value).startswith("regex: ") and e.value.param == "regex"
    assert not re.search(r"\.cc:\d+|\[\d\d:\d\d", str(e.value))  # no C++ source location or timestamp


def test_forced_tool_calls_parse_and_match_their_schemas(outputs):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    clock = {"type": "function", "function": {"name": "get_time"}}
    calls = tool_call_format([weather, clock], parallel=True)
    grammar = so.RequestGrammar(outputs.compile(so.Constraint((calls,), prefix='{"name": "')))
    text = 'get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'
    feed(outputs, grammar, text)
    assert 2 in allowed(outputs, grammar)
    assert [c["function"]["name"] for c in parse('{"name": "' + text)[1]] == ["get_weather", "get_time"]
    single = so.RequestGrammar(outputs.compile(so.Constraint((tool_call_format([weather], parallel=False),))))
    assert not single.matcher.accept_string('{"name": "get_weather", "parameters": {}}')  # city is required
    feed(outputs, single, '{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert allowed(outputs, single) == {2}


def test_constrained_requests_never_speculate():
    constraint = so.CompiledConstraint(grammar=None, prefix="")
    assert speculates(SamplingParams()) and not speculates(SamplingParams(constraint=constraint))


# --------------------------------------------------------------------------------- the sampler

def test_the_mask_touches_its_rows_alone_and_keeps_the_batch_invariance():
    torch.manual_seed(0)
    vocab, words = 100, 4
    logits = torch.randn(4, vocab)
    bits = torch.zeros(2, words, dtype=torch.int32)
    bits[0, 1] = 1 << 3  # token 35 only
    bits[1, 0], bits[1, 2] = 0b101, -1  # tokens 0, 2 and 64..95
    masked = apply_token_mask(logits.clone(), TokenMask([1, 3], bits))
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])
    assert torch.isfinite(masked[1]).nonzero().squeeze(1).tolist() == [35]
    assert torch.isfinite(masked[3]).nonzero().squeeze(1).tolist() == [0, 2] + list(range(64, 96))

    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5)]
    def sample(rows, mask):
        gens = [make_generator(5) for _ in rows]
        return Sampler().sample(logits[rows].clone(), [params[r % 2] for r in rows], gens, [[]] * len(rows),
                                [[]] * len(rows), mask).token_ids
    alone = sample([1], TokenMask([0], bits[:1])) + sample([3], TokenMask([0], bits[1:]))
    batched = sample([0, 1, 2, 3], TokenMask([1, 3], bits))
    assert [batched[1], batched[3]] == alone and alone[0] == 35 and alone[1] in [0, 2, *range(64, 96)]
    assert [batched[0], batched[2]] == sample([0], None) + sample([2], None)


def test_logprobs_describe_the_model_before_the_mask():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bits = torch.tensor([[0b0001]], dtype=torch.int32)  # token 0 only
    out = Sampler().sample(logits.clone(), [SamplingParams(temperature=0, logprobs=True, top_logprobs=2)], [None],
                           [[]], [[]], TokenMask([0], bits))
    expected = logits.log_softmax(-1)[0]
    assert out.token_ids == [0] and out.logprobs[0] == pytest.approx(expected[0].item())
    assert [t for t, _ in out.top_logprobs[0]] == [3, 2]


# ------------------------------------------------------------------------ served, end to end

@pytest.fixture(scope="module")
def client(smollm2_server):
    return openai.OpenAI(base_url=smollm2_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_parse_with_a_pydantic_model_returns_the_object(client):
    reply = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Ada Lovelace and her pets as JSON."}],
        response_format=Person, max_tokens=160, temperature=0)
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person) and reply.choices[0].finish_reason == "stop"
    assert all(isinstance(p, Pet) for p in person.pets)


def test_fifty_nested_schema_requests_all_return_valid_json(client, capsys):
    people = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Marie Curie", "Isaac Newton", "Emmy Noether",
              "Niels Bohr", "Rosalind Franklin", "Kurt Goedel", "Katherine Johnson"]
    ways = ["Describe {} and their pets as JSON.", "Give {} as a JSON record.", "Who was {}? Answer in JSON.",
            "Write a JSON profile of {}.", "Tell me about {} and the animals they kept, as JSON."]
    schema = {"type": "json_schema", "json_schema": {"name": "Person", "schema": Person.model_json_schema()}}

    def ask(i):
        prompt = ways[i % len(ways)].format(people[i // len(ways)])
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               response_format=schema, max_tokens=160, temperature=0)
        return reply.choices[0].finish_reason, reply.choices[0].message.content, reply.usage.completion_tokens

    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(ask, range(50)))
    assert [r for r, _, _ in replies] == ["stop"] * 50
    people_out = [Person.model_validate_json(text) for _, text, _ in replies]
    assert len({p.name for p in people_out}) > 5
    with capsys.disabled():
        tokens = sorted(n for _, _, n in replies)
        print(f"\n50 nested-schema replies: {tokens[0]}..{tokens[-1]} tokens, all valid")


def test_regex_choice_and_grammar_on_both_routes(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                          extra_body={"guided_choice": ["yes", "no"]}, temperature=0)
    assert chat.choices[0].message.content in ("yes", "no") and chat.choices[0].finish_reason == "stop"
    text = client.completions.create(model=MODEL, prompt="My phone number is", max_tokens=20, temperature=1.0, seed=3,
                                     extra_body={"regex": r" [0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", text.choices[0].text) and text.choices[0].finish_reason == "stop"
    grammar = 'root ::= "The answer is " digit "." \ndigit ::= [0-9]'
    ebnf = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                          extra_body={"ebnf": grammar}, temperature=0, n=2)
    assert all(re.fullmatch(r"The answer is [0-9]\.", c.message.content) for c in ebnf.choices)
    # ignore_eos: the output goes on while the grammar allows more, then ends where it must.
    digits = client.completions.create(model=MODEL, prompt="Digits:", max_tokens=30, temperature=0,
                                       extra_body={"regex": "[0-9]{1,12}", "ignore_eos": True})
    assert re.fullmatch("[0-9]{12}", digits.choices[0].text) and digits.choices[0].finish_reason == "stop"


def test_streamed_json_adds_up_to_valid_json(client):
    chunks = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe Grace Hopper as JSON."}], stream=True,
        temperature=0, max_tokens=160, extra_body={"structured_outputs": {"json": Person.model_json_schema(),
                                                                        "disable_any_whitespace": True}})
    pieces = [c.choices[0] for c in chunks if c.choices]
    text = "".join(p.delta.content or "" for p in pieces)
    assert Person.model_validate_json(text) and text == json.dumps(json.loads(text))  # compact: ", " and ": " only
    assert pieces[-1].finish_reason == "stop"


def test_forced_tool_calls_always_parse(client):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    messages = [{"role": "user", "content": "What is the weather in Paris, and the time?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[weather, clock],
                                               tool_choice=choice, temperature=1.0, seed=11, max_tokens=80,
                                               parallel_tool_calls=False)
        (call,) = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and call.function.name in ("get_weather", "get_time")
        arguments = json.loads(call.function.arguments)
        assert (arguments == {}) if call.function.name == "get_time" else isinstance(arguments["city"], str)


@pytest.mark.parametrize("body, param, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", 'Unsupported type "objekt"'),
    ({"regex": "a(b"}, "regex", "parenthesis is not closed"),
    ({"ebnf": "root ::= b"}, "ebnf", 'Rule "b" is not defined'),
    ({"guided_choice": ["a"], "regex": "b"}, "guided_choice", "at most one"),
])
def test_bad_constraints_are_400s_with_the_reason(smollm2_server, body, param, says):
    for route, prompt in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "hi"})):
        r = httpx.post(smollm2_server.base_url + route, json={**prompt, **body}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and says in r.json()["error"]["message"]
