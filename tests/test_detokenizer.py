"""Incremental detokenization against the tokenizer's own full decode, and stop conditions.

The oracle is `tokenizers.Tokenizer.decode` of the whole sequence: the streamed deltas must
concatenate to it exactly, for a real byte-level BPE (SmolLM2), a tiny byte-level BPE trained
here, and two SentencePiece-style tokenizers (Llama 2's Replace+ByteFallback+Strip decoder, and a
Metaspace decoder) whose decoders drop a leading space at the start of each decode call.
"""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from llama_aot.runtime.detokenizer import IncrementalDetokenizer, StopChecker

TEXTS = [
    "Hello, world! How are you today?",
    "🦙🎉 party 🦙",
    "你好世界，今天天气很好。",
    "Combining accents: e\u0301 cafe\u0301 n\u0303o, and a family 👨\u200d👩\u200d👧.",
    "def f(x):\n\tif x:\n        return  x ** 2   # trailing  \n\n",
    "  leading spaces and mixed: naïve façade 日本語 🙂 end",
]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?",
    "def f(x):\n    return x * 2\n\nclass A:\n    pass\n",
    "Llama models write text, code and poems; tokens split words into pieces.",
] * 20


def _byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|eos|>"], show_progress=False))
    return tok


def _llama2_style() -> Tokenizer:
    """SentencePiece BPE as Llama 2 ships it in tokenizer.json: ▁ for spaces, <0xNN> byte
    fallback for characters outside the vocabulary, and a decoder that strips one leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=80, show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


def _metaspace() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(_CORPUS + TEXTS, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "</s>"], show_progress=False))
    return tok


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint) -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json"))


@pytest.fixture(scope="module", params=["smollm2", "byte_level_bpe", "llama2_style", "metaspace"])
def tokenizer(request) -> Tokenizer:
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2")
    return {"byte_level_bpe": _byte_level_bpe, "llama2_style": _llama2_style,
            "metaspace": _metaspace}[request.param]()


def _stream(tokenizer, prompt_ids, ids, skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    return [detok.add(t) for t in ids]


def _assert_clean(deltas):
    for delta in deltas:
        assert "\ufffd" not in delta
        delta.encode("utf-8")  # raises on lone surrogates


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    deltas = _stream(tokenizer, [], ids)
    _assert_clean(deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_after_a_prompt_continue_its_text(tokenizer, text):
    """After a prompt, the first output token is not at the start of the text, so its leading
    space survives: the deltas are what decoding prompt + output adds to decoding the prompt."""
    prompt = tokenizer.encode("Say something, please:", add_special_tokens=False).ids
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    deltas = _stream(tokenizer, prompt, ids)
    _assert_clean(deltas)
    whole, prefix = tokenizer.decode(prompt + ids), tokenizer.decode(prompt)
    assert whole.startswith(prefix)
    assert "".join(deltas) == whole[len(prefix):]


@pytest.mark.parametrize("tokenizer", ["smollm2", "byte_level_bpe", "llama2_style"], indirect=True)
def test_split_characters_are_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("🦙🎉", add_special_tokens=False).ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), "the emoji should span several tokens"
    deltas = _stream(tokenizer, [], ids)
    assert "" in deltas and "".join(deltas) == tokenizer.decode(ids)
    assert all(len(d.encode()) % 4 == 0 for d in deltas)  # whole 4-byte emoji, never a part


def test_window_stays_small_on_long_outputs(smollm2):
    """Each step decodes a few tokens, not the whole output."""
    class Spy:
        widest = 0

        def decode(self, ids, skip_special_tokens):
            Spy.widest = max(Spy.widest, len(ids))
            return smollm2.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = smollm2.encode(" ".join(TEXTS) * 20, add_special_tokens=False).ids
    assert len(ids) > 1000
    deltas = _stream(Spy(), [1, 2, 3, 4, 5, 6, 7], ids)
    assert "".join(deltas) == smollm2.decode(ids)
    assert Spy.widest <= 12


def test_special_tokens_are_skipped_or_kept(smollm2):
    end = smollm2.token_to_id("<|im_end|>")
    ids = smollm2.encode("Hi there", add_special_tokens=False).ids + [end]
    assert "".join(_stream(smollm2, [], ids)) == "Hi there"
    assert "".join(_stream(smollm2, [], ids, skip_special_tokens=False)) == "Hi there<|im_end|>"
    chat_prompt = smollm2.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n").ids
    assert "".join(_stream(smollm2, chat_prompt, ids)) == "Hi there"


def _check_all(checker, steps):
    """Feeds (token_id, delta) pairs; returns the emitted text per step and the finish reason."""
    emitted, reason = [], None
    for token_id, delta in steps:
        text, reason = checker.check(token_id, delta)
        emitted.append(text)
        if reason:
            break
    return emitted, reason


def _tokens(*deltas):
    return [(100 + i, d) for i, d in enumerate(deltas)]


def test_stop_string_split_across_tokens_is_caught_and_not_emitted():
    emitted, reason = _check_all(StopChecker(stop=["STOP"]), _tokens("Hello", " wo", "rld ST", "O", "P!", "x"))
    assert reason == "stop"
    assert emitted == ["Hello", " wo", "rld ", "", ""]


def test_text_that_only_starts_like_a_stop_string_is_released():
    emitted, reason = _check_all(StopChecker(stop=["STOP"]), _tokens("ab", "S", "T", "OX", "!"))
    assert reason is None
    assert emitted == ["ab", "", "", "STOX", "!"]


def test_earliest_stop_string_wins_and_overlaps_are_found():
    emitted, reason = _check_all(StopChecker(stop=["world", "lo w"]), _tokens("hel", "lo wor", "ld"))
    assert (emitted, reason) == (["he", "l"], "stop")  # "l" could start "lo w", so it waits
    emitted, reason = _check_all(StopChecker(stop=["aab"]), _tokens("a", "a", "a", "b"))
    assert (emitted, reason) == (["", "", "a", ""], "stop")
    emitted, reason = _check_all(StopChecker(stop=["\n\n", "###"]), _tokens("x#", "#", "\n", "\n"))
    assert (emitted, reason) == (["x", "", "##", ""], "stop")


def test_stop_token_ids_and_eos_finish_without_their_text():
    checker = StopChecker(stop=["STOP"], stop_token_ids=[7], eos_token_ids=[2])
    assert checker.check(100, "ok ST") == ("ok ", None)
    assert checker.check(7, "<stop>") == ("ST", "stop")  # held text is released, token text is not
    assert StopChecker(eos_token_ids=[2]).check(2, "</s>") == ("", "stop")
    with pytest.raises(RuntimeError, match="already finished"):
        checker.check(100, "more")


def test_ignore_eos_keeps_generating_but_stop_token_ids_still_stop():
    checker = StopChecker(stop_token_ids=[7], eos_token_ids=[2], ignore_eos=True)
    assert checker.check(2, "") == ("", None)
    assert checker.check(2, "x") == ("x", None)
    assert checker.check(7, "y") == ("", "stop")


def test_max_tokens_finishes_with_length_and_flushes_held_text():
    checker = StopChecker(stop=["STOP"], max_tokens=3)
    assert _check_all(checker, _tokens("a", "b", "cST", "d")) == (["a", "b", "cST"], "length")
    # A stop string completed by the last allowed token is a stop, not a length finish.
    assert _check_all(StopChecker(stop=["STOP"], max_tokens=2), _tokens("ST", "OP")) == (["", ""], "stop")
    assert StopChecker(max_tokens=1).check(5, "z") == ("z", "length")


def test_engine_side_finish_releases_held_text():
    checker = StopChecker(stop=["</answer>"])
    assert checker.check(1, "42</ans") == ("42", None)
    assert checker.finish("length") == ("</ans", "length")
    assert checker.finish_reason == "length"


def test_stop_strings_with_a_real_tokenizer(smollm2):
    text = "The answer is 42 🎉🎉.\nUser: what next?"
    for stop, before in (["\nUser:"], "The answer is 42 🎉🎉."), (["🎉."], "The answer is 42 🎉"):
        detok = IncrementalDetokenizer(smollm2, [])
        checker = StopChecker(stop=stop)
        out, reason = "", None
        for token_id in smollm2.encode(text, add_special_tokens=False).ids:
            emitted, reason = checker.check(token_id, detok.add(token_id))
            out += emitted
            if reason:
                break
        assert (out, reason) == (before, "stop")


def test_invalid_stop_checker_arguments():
    with pytest.raises(ValueError, match="empty"):
        StopChecker(stop=[""])
    with pytest.raises(ValueError, match="max_tokens"):
        StopChecker(max_tokens=0)
