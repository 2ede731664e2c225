"""The request bodies of the OpenAI routes, as strict pydantic models.

Strict: a field of the wrong type is a 400 naming that field, not a silent coercion ("1" is not
a max_tokens). Fields OpenAI defines but we do not implement are either accepted with OpenAI's
meaning (user, parallel_tool_calls) or refused by name (best_of, response_format other than
text); unknown extra fields are ignored, as the OpenAI API ignores them.
Range checks of sampling values live in SamplingParams, the one place that knows them.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llama_aot.runtime.sampling import SamplingParams
from llama_aot.serve.errors import APIError


MAX_CHOICES = 128  # OpenAI's bound on n


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
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def template_kwargs(self) -> dict[str, Any]:
        return template_kwargs(self.chat_template_kwargs)

    def sampling_params(self) -> SamplingParams:
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise APIError(400, "response_format other than {\"type\": \"text\"} is not supported",
                           "response_format")
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
