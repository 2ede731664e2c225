"""Streaming text out of generated tokens: incremental detokenization and stop conditions.

Why decoding is incremental and windowed: a token's text depends on its neighbours. Byte-level BPE
(Llama 3, SmolLM2) splits one emoji or CJK character over several tokens, each of which alone
decodes to U+FFFD; SentencePiece-style decoders (Metaspace, or Replace+ByteFallback+Strip) drop the
leading space of whichever token comes first in a decode call. Decoding each token alone is wrong,
and decoding the whole sequence every step is quadratic. The standard fix (from HF TGI and vLLM):
keep two offsets into the ids, `prefix` and `read`. The text of ids[prefix:read] was already
emitted; decode ids[prefix:] and emit what it adds beyond decode(ids[prefix:read]). Both decodes
start at the same token, so decoder quirks at the window start cancel out. When the new text ends
in U+FFFD the bytes of a character are still incomplete: emit nothing and wait for more tokens.

Why stop strings are a separate step: they act on text, across token boundaries, and what they
hold back (a possible start of a stop string) is a different thing from what the detokenizer holds
back (an incomplete character).
"""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer

# How many prompt tokens to decode as left context for the first generated token (vLLM's choice):
# enough for a SentencePiece decoder to see that the first output token is not the text's start.
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas of generated tokens, one `add` per token, that concatenate to the decoded text.

    The deltas never end inside a character: the bytes of an incomplete UTF-8 character are held
    back until the token that completes it. Bytes still incomplete when generation ends are never
    emitted (they would only render as U+FFFD). Memory and time per token are bounded by the
    window, not by the sequence length.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_ids)[-PROMPT_CONTEXT_TOKENS:]
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def add(self, token_id: int) -> str:
        """Appends one generated token; returns the text it completes (often '', never a partial
        character)."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = text[len(self._prefix_text):]
        # Slide the window: what was read becomes the next prefix, and older ids are dropped.
        self._ids = self._ids[self._read:]
        self._prefix, self._read = 0, len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta


class StopChecker:
    """Decides, token by token, which text a request may emit and when it is finished, with
    OpenAI's semantics: the output stops *before* a stop string, which is never emitted; stop
    token ids and EOS end the request without emitting their own text ("stop"); reaching
    max_tokens ends it with "length". Since a stop string can span tokens, the longest tail of the
    pending text that could still begin a stop string is held back until it either completes one
    or diverges; on finish, held text that did not become a stop string is released.
    """

    def __init__(self, stop: Iterable[str] = (), stop_token_ids: Iterable[int] = (),
                 eos_token_ids: Iterable[int] = (), ignore_eos: bool = False,
                 max_tokens: int | None = None):
        self._stop = tuple(stop)
        if any(s == "" for s in self._stop):
            raise ValueError("stop strings must not be empty")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        self._finishing_ids = frozenset(stop_token_ids)
        if not ignore_eos:
            self._finishing_ids |= frozenset(eos_token_ids)
        self._max_tokens = max_tokens
        self._longest_hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""
        self._num_tokens = 0
        self.finish_reason: str | None = None

    def ends_with(self, token_id: int) -> bool:
        """Whether this token ends the request whatever the text: a stop token id or EOS."""
        return token_id in self._finishing_ids

    def check(self, token_id: int, delta: str) -> tuple[str, str | None]:
        """Takes the newly generated token and its text delta; returns the text to emit now and
        the finish reason ("stop", "length") or None while the request goes on."""
        if self.finish_reason is not None:
            raise RuntimeError(f"request already finished ({self.finish_reason}); no more tokens")
        self._num_tokens += 1
        if self.ends_with(token_id):
            return self.finish("stop")
        text = self._pending + delta
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            self.finish_reason = "stop"
            return text[:cut], "stop"
        self._pending = text[len(text) - self._held_length(text):]
        emit = text[:len(text) - len(self._pending)]
        if self._max_tokens is not None and self._num_tokens >= self._max_tokens:
            flushed, reason = self.finish("length")
            return emit + flushed, reason
        return emit, None

    def finish(self, reason: str) -> tuple[str, str]:
        """Ends the request (the engine calls this itself when, say, the context is full) and
        releases the held-back text, which can no longer become a stop string."""
        text, self._pending = self._pending, ""
        self.finish_reason = reason
        return text, reason

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._longest_hold), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
