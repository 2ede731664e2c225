"""OpenAI response objects: chat completions and text completions, whole or as stream chunks,
with usage and logprobs in the shapes the stock `openai` client parses."""
from __future__ import annotations

import json

from llama_aot.runtime.engine import RequestOutput


def usage(lasts: list[RequestOutput]) -> dict:
    """The usage of one request's choices (each one's last output): the prompt once, every choice's
    completion tokens, and as cached the prompt tokens a choice found in the prefix cache (with
    n > 1, the later choices': serve/choices.py prefills the prompt once for all of them)."""
    prompt, completion = lasts[0].prompt_tokens, sum(last.completion_tokens for last in lasts)
    cached = min(last.cached_tokens for last in lasts[1:]) if len(lasts) > 1 else lasts[0].cached_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class TokenText:
    """A token's own text for logprobs: decoded alone, special tokens kept, bytes listed so a
    client can rebuild characters split across tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_entry(self, token_id: int, logprob: float, top: list[tuple[int, float]] | None) -> dict:
        text = self(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": self(t), "logprob": lp, "bytes": list(self(t).encode())}
                                 for t, lp in (top or [])]}

    def chat_logprobs(self, outputs: list[RequestOutput]) -> dict | None:
        entries = [self.chat_entry(o.token_id, o.logprob, o.top_logprobs) for o in outputs
                   if o.token_id is not None and o.logprob is not None]
        return {"content": entries} if entries else None

    def completion_logprobs(self, outputs: list[RequestOutput], offset: int = 0) -> dict | None:
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for o in outputs:
            if o.token_id is None or o.logprob is None:
                continue
            text = self(o.token_id)
            tokens.append(text)
            token_logprobs.append(o.logprob)
            tops.append({self(t): lp for t, lp in (o.top_logprobs or [])})
            offsets.append(offset)
            offset += len(text)
        if not tokens:
            return None
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_completion(request_id: str, created: int, model: str, choices: list[tuple[dict, str, dict | None]],
                    lasts: list[RequestOutput]) -> dict:
    """`choices`: each one's (message, finish_reason, logprobs), in index order."""
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason}
                        for i, (message, reason, logprobs) in enumerate(choices)],
            "usage": usage(lasts)}


def chat_chunk(request_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               logprobs: dict | None = None, index: int = 0) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def text_completion(request_id: str, created: int, model: str, choices: list[tuple[str, str | None, dict | None]],
                    lasts: list[RequestOutput] | None = None) -> dict:
    """`choices`: each one's (text, finish_reason, logprobs), in index order."""
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
                        for i, (text, reason, logprobs) in enumerate(choices)]}
    if lasts is not None:
        body["usage"] = usage(lasts)
    return body


def text_chunk(request_id: str, created: int, model: str, index: int, text: str, finish_reason: str | None,
               logprobs: dict | None) -> dict:
    """One streamed completion chunk of choice `index`."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, created: int, model: str, obj: str, lasts: list[RequestOutput]) -> dict:
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(lasts)}
