"""The OpenAI-compatible routes over one engine.

/v1/chat/completions and /v1/completions, streamed as server-sent events or whole; /v1/models;
/tokenize and /detokenize (as vLLM and SGLang serve them, so that their clients and benchmark
scripts count tokens with the server's own tokenizer); /health; /metrics. With an API key, /v1/*
requires `Authorization: Bearer KEY`. Tool calls use the llama3 JSON format when the server runs
with --tool-call-parser llama3.

Structured output (serve/protocol.py reads the request's fields) is compiled on a worker thread
before the request reaches the engine, so neither the event loop nor the engine waits for a
schema's compilation; tool_choice "required" or a named function constrains the call the same way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from llama_aot.runtime import structured_output as so
from llama_aot.runtime.engine import Engine, RequestOutput
from llama_aot.runtime.sampling import SamplingParams
from llama_aot.serve import responses as R
from llama_aot.serve.auth import BearerAuth
from llama_aot.serve.chat_template import ChatTemplate
from llama_aot.serve.choices import Choices
from llama_aot.serve.errors import APIError, error_body, install_error_handlers
from llama_aot.serve.metrics import Metrics
from llama_aot.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from llama_aot.serve.tool_parser import StreamingToolParser, call_opening, parse, tool_call_format, tools_for_choice

TOOL_CALL_PARSERS = ("llama3",)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str = "default"
    tool_call_parser: str | None = None

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port}: must be between 1 and 65535")
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(f"--tool-call-parser {self.tool_call_parser}: choose one of {', '.join(TOOL_CALL_PARSERS)}")
        if self.api_key == "":
            raise ValueError("--api-key must not be empty")


def forced_call_prefix(tool_choice, forced_name: str | None) -> str:
    """Llama 3.1's JSON tool-call opening, fed to the model after the generation prompt, so that
    tool_choice "required" (or a named function) yields a call rather than prose."""
    if forced_name is not None:
        return call_opening(forced_name)
    return '{"name": "' if tool_choice == "required" else ""


def chat_constraint(body: ChatCompletionRequest, tools: list | None, forced: bool, prefix: str) -> so.Constraint | None:
    """What a chat completion's output must match: the tool calls when a call is forced (the
    response format then describes a later answer, not this turn's calls); a call or the
    response format when the model may choose (tool_choice "auto"); else the response format."""
    found = body.output_format()
    if tools is not None and forced:
        return so.Constraint((tool_call_format(tools, body.parallel_tool_calls),), prefix, "tools")
    if found is None:
        return None
    fmt, param = found
    if tools is not None:
        return so.Constraint((tool_call_format(tools, body.parallel_tool_calls), fmt), param=param)
    return so.Constraint((fmt,), param=param)


async def constrained(engine: Engine, params: SamplingParams, constraint: so.Constraint | None) -> SamplingParams:
    """`params` with the constraint's compiled grammar; compiling (or the cache) runs on a worker thread."""
    if constraint is None:
        return params
    return dataclasses.replace(params, constraint=await run_in_threadpool(engine.structured.compile, constraint))


def create_app(engine: Engine, template: ChatTemplate | None, config: ServeConfig) -> FastAPI:
    """`template` is None for a base model without a chat template: chat requests are then a 400."""
    app = FastAPI(title="llama-aot")
    install_error_handlers(app)
    metrics = Metrics()
    token_text = R.TokenText(engine.tokenizer)
    model_name = config.served_model_name
    vocab_size = engine.runner.model_config.vocab_size

    if config.api_key:
        app.add_middleware(BearerAuth, api_key=config.api_key)

    def check_token_ids(ids: list[int], what: str, param: str) -> None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"{what} {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})", param)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "llama-aot",
                                            "max_model_len": engine.runtime.context_length}]}

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(metrics.render(engine.stats), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.checked().model)
        if body.prompt is not None:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = engine.tokenizer.encode(body.prompt, add_special_tokens=add_special).ids
        elif template is None:
            raise APIError(400, "this model has no chat template; tokenize a prompt instead", "messages")
        else:
            ids = template.encode(body.messages, body.tools, body.add_generation_prompt,
                                  **body.template_kwargs())
        token_strs = [engine.tokenizer.id_to_token(i) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.runtime.context_length, "tokens": ids,
                "token_strs": token_strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        check_token_ids(body.tokens, "token ids", "tokens")
        text = engine.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)
        return {"prompt": text, "text": text}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        if template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        params = body.sampling_params()
        tools, forced_name = tools_for_choice(body.tools, body.tool_choice)
        if tools is not None and config.tool_call_parser is None:
            raise APIError(400, "tool calling needs the server to run with --tool-call-parser llama3", "tools")
        prompt = template.encode(body.messages, tools, **body.template_kwargs())
        prefix = forced_call_prefix(body.tool_choice, forced_name) if tools is not None else ""
        if prefix:
            prompt += engine.tokenizer.encode(prefix, add_special_tokens=False).ids
        params = await constrained(engine, params, chat_constraint(body, tools, bool(prefix), prefix))
        choices = Choices(engine, metrics, prompt, params, body.choices(), "chatcmpl", "messages")
        if body.stream:
            return _event_stream(_chat_events(choices, body, tools is not None, prefix))
        outputs = await choices.collect(request)
        return R.chat_completion(choices.request_id, choices.created, model_name,
                                 [_chat_choice(o, body.logprobs, tools is not None, prefix) for o in outputs],
                                 [_last(o) for o in outputs])

    def _chat_choice(outputs: list[RequestOutput], logprobs: bool, tools: bool, prefix: str):
        """(message, finish_reason, logprobs) of one choice; its tool calls parsed when tools were given."""
        text = "".join(o.text for o in outputs)
        message: dict = {"role": "assistant", "content": text}
        reason = outputs[-1].finish_reason
        if tools:
            content, calls = parse(prefix + text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                reason = "tool_calls" if reason == "stop" else reason
        return message, reason, token_text.chat_logprobs(outputs) if logprobs else None

    async def _chat_events(choices: Choices, body: ChatCompletionRequest, tools: bool, prefix: str):
        """Without a tool parser, one chunk per generated token, as in `_completion_events`; with
        n > 1 the choices' chunks interleave, each with its index."""
        def chunk(index, delta, reason=None, logprobs=None):
            return R.sse(R.chat_chunk(choices.request_id, choices.created, model_name, delta, reason, logprobs, index))

        parsers = [StreamingToolParser() if tools else None for _ in range(choices.n)]
        called = [False] * choices.n
        lasts: list[RequestOutput | None] = [None] * choices.n
        for index, parser in enumerate(parsers):
            yield chunk(index, {"role": "assistant", "content": ""})
            if parser is not None and prefix:
                for event in parser.feed(prefix):
                    called[index] |= "tool_calls" in event
                    yield chunk(index, event)
        async for index, out in choices.outputs():
            if out.error is not None:
                yield R.sse(error_body(500, out.error))
                return
            parser = parsers[index]
            if parser is None:
                if out.text or out.token_id is not None:
                    logprobs = token_text.chat_logprobs([out]) if body.logprobs else None
                    yield chunk(index, {"content": out.text}, logprobs=logprobs)
            else:
                for event in parser.feed(out.text) + (parser.finish() if out.finish_reason else []):
                    called[index] |= "tool_calls" in event
                    yield chunk(index, event)
            if out.finish_reason is not None:
                lasts[index] = out
                yield chunk(index, {}, "tool_calls" if called[index] and out.finish_reason == "stop" else out.finish_reason)
        if body.include_usage:
            yield R.sse(R.usage_chunk(choices.request_id, choices.created, model_name, "chat.completion.chunk", lasts))
        yield R.SSE_DONE

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        params = body.sampling_params()
        found = body.output_format()
        params = await constrained(engine, params, so.Constraint((found[0],), param=found[1]) if found else None)
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            ids = engine.tokenizer.encode(prompt, add_special_tokens=True).ids
        else:
            check_token_ids(prompt, "prompt token ids", "prompt")
            ids = list(prompt)
        choices = Choices(engine, metrics, ids, params, body.choices(), "cmpl", "prompt")
        if body.stream:
            return _event_stream(_completion_events(choices, body))
        outputs = await choices.collect(request)
        lasts = [_last(o) for o in outputs]
        return R.text_completion(choices.request_id, choices.created, model_name,
                                 [("".join(x.text for x in o), last.finish_reason,
                                   token_text.completion_logprobs(o) if body.logprobs is not None else None)
                                  for o, last in zip(outputs, lasts)], lasts)

    async def _completion_events(choices: Choices, body: CompletionRequest):
        """One chunk per generated token, with empty text while the text is held back (an
        incomplete character, or a possible start of a stop string), as vLLM streams completions:
        a client that counts or times tokens by chunks stays right, and a stream never goes quiet
        while tokens are being generated (in the H200 sweep, streams of the random-weight model
        carried no text for up to 10 s while their time per token stayed at the median: long
        enough for a proxy's idle timeout). With n > 1 the choices' chunks interleave."""
        offsets = [0] * choices.n
        lasts: list[RequestOutput | None] = [None] * choices.n
        async for index, out in choices.outputs():
            if out.error is not None:
                yield R.sse(error_body(500, out.error))
                return
            logprobs = token_text.completion_logprobs([out], offsets[index]) if body.logprobs is not None else None
            offsets[index] += len(out.text)
            if out.text or out.finish_reason or out.token_id is not None:
                yield R.sse(R.text_chunk(choices.request_id, choices.created, model_name, index, out.text,
                                         out.finish_reason, logprobs))
            if out.finish_reason is not None:
                lasts[index] = out
        if body.include_usage:
            yield R.sse(R.usage_chunk(choices.request_id, choices.created, model_name, "text_completion", lasts))
        yield R.SSE_DONE

    return app


def _last(outputs: list[RequestOutput]) -> RequestOutput:
    last = outputs[-1]
    if last.error is not None:
        raise APIError(503, last.error)
    return last


def _event_stream(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
