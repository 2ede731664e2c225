"""The sampler against hand-written references: validation, greedy, penalties, truncation sets,
the sampled distribution, per-request seeds under batching, and logprobs."""
import math

import pytest
import torch

from llama_aot.runtime import sampling
from llama_aot.runtime.sampling import (Sampler, SamplingParams, SamplingParamsError,
                                        apply_penalties, greedy_tokens, make_generator)


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=2.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(min_p=-0.01), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(seed=1.5), "seed"),
    (dict(seed=1 << 64), "seed"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(presence_penalty=2.1), "presence_penalty"),
    (dict(presence_penalty=-2.1), "presence_penalty"),
    (dict(frequency_penalty=3), "frequency_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=1.0), "max_tokens"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(stop=[""]), "stop"),
    (dict(stop=""), "stop"),
    (dict(stop=[1]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=["7"]), "stop_token_ids"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(logprobs="yes"), "logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=-1), "top_logprobs"),
    (dict(top_logprobs=3), "top_logprobs"),
])
def test_invalid_params_name_the_openai_field(kwargs, param):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert isinstance(info.value, ValueError)
    assert param in str(info.value)


def test_valid_params_are_normalised():
    p = SamplingParams(temperature=0, top_k=0, stop="###", stop_token_ids=[3, 4], seed=-5,
                       max_tokens=1, logprobs=True, top_logprobs=20, repetition_penalty=5)
    assert p.greedy and p.stop == ("###",) and p.stop_token_ids == (3, 4)
    assert isinstance(p.temperature, float) and isinstance(p.repetition_penalty, float)
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop=["a", "b", "c", "d"]).stop == ("a", "b", "c", "d")
    assert not SamplingParams().greedy and not SamplingParams().has_penalties
    assert SamplingParams(temperature=2, top_p=1, min_p=1, presence_penalty=-2).has_penalties


def _sample(logits, params, generators=None, prompts=None, outputs=None):
    n = logits.shape[0]
    return Sampler().sample(logits, params, generators or [None] * n, prompts or [[]] * n,
                            outputs or [[]] * n)


def test_greedy_is_argmax_of_each_row_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(16, 5000)
    params = [SamplingParams(temperature=0) if i % 2 == 0 else SamplingParams(top_k=5) for i in range(16)]
    gens = [make_generator(i) for i in range(16)]
    out = _sample(logits, params, gens)
    for i in range(0, 16, 2):
        assert out.token_ids[i] == logits[i].argmax().item()
    # Greedy ignores the truncation parameters.
    alone = _sample(logits[:1], [SamplingParams(temperature=0, top_p=0.01, min_p=0.9)])
    assert alone.token_ids == [logits[0].argmax().item()]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("vocab", [128256, 49152, 5003])  # Llama 3, SmolLM2, a prime (no groups)
def test_greedy_tokens_is_argmax_with_first_maximum_winning(device, vocab):
    """Exactly torch.argmax per row, ties across and within groups included, in bf16 and float32."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, vocab, generator=gen)
    logits[1, [7, vocab - 1]] = 50.0          # a tie: the earlier index wins
    logits[2, [1500, 1501, 3000]] = 50.0      # ties inside one group and across groups
    logits[3] = 0.0                            # all equal: token 0
    logits[4, vocab // 2] = float("nan")      # argmax treats NaN as the maximum
    for dtype in (torch.float32, torch.bfloat16):
        rows = logits.to(device, dtype)
        assert greedy_tokens(rows).tolist() == rows.argmax(-1).tolist()
        assert greedy_tokens(rows[5]).item() == rows[5].argmax().item()


def _penalised_reference(row, p, prompt, output):
    out = row.clone()
    counts = {t: output.count(t) for t in set(output)}
    for t in range(row.numel()):
        value = out[t]
        if t in set(prompt) | set(output):
            value = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        if t in counts:
            value = value - p.frequency_penalty * counts[t] - p.presence_penalty
        out[t] = value
    return out


def test_penalties_match_the_formulas_element_by_element():
    torch.manual_seed(1)
    logits = torch.randn(5, 12) * 3
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(frequency_penalty=0.7),
        SamplingParams(presence_penalty=-1.2),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.3, presence_penalty=1.9),
    ]
    prompts = [[0, 1, 1, 2], [3], [4, 5], [6], [7, 8, 11]]
    outputs = [[2, 3, 3], [5, 5, 5, 9], [9, 10, 10], [1, 2], [8, 8, 0, 1]]
    got = apply_penalties(logits, params, prompts, outputs)
    for i, p in enumerate(params):
        torch.testing.assert_close(got[i], _penalised_reference(logits[i], p, prompts[i], outputs[i]),
                                   rtol=0, atol=1e-6)
    assert torch.equal(got[3], logits[3])
    assert apply_penalties(logits, [SamplingParams()] * 5, prompts, outputs) is logits
    # Greedy picks the argmax after penalties: token 0 is best raw but its repeats push it down.
    row = torch.tensor([[5.0, 4.0, 0.0]])
    out = _sample(row, [SamplingParams(temperature=0, frequency_penalty=1.0)], outputs=[[0, 0]])
    assert out.token_ids == [1]


def _allowed(logits, p):
    """The admissible set by the definitions, one token at a time: min_p, then top_k, then top_p."""
    probs = logits.softmax(-1).tolist()
    keep = [t for t in range(len(probs)) if probs[t] >= p.min_p * max(probs)]
    if p.top_k > 0:
        kth = sorted((logits[t].item() for t in keep), reverse=True)[min(p.top_k, len(keep)) - 1]
        keep = [t for t in keep if logits[t].item() >= kth]
    mass = sum(probs[t] for t in keep)
    chosen, total = set(), 0.0
    for t in sorted(keep, key=lambda t: -probs[t]):
        if total >= p.top_p * mass:
            break
        chosen.add(t)
        total += probs[t]
    return chosen


@pytest.mark.parametrize("candidates", [1024, 8])  # 8: the top-k head is too short, forcing full sorts
@pytest.mark.parametrize("params", [
    SamplingParams(top_k=4),
    SamplingParams(top_k=12),
    SamplingParams(top_p=0.6),
    SamplingParams(top_p=0.95, temperature=1.8),
    SamplingParams(min_p=0.2),
    SamplingParams(top_k=6, top_p=0.8, min_p=0.05, temperature=1.3),
])
def test_truncation_never_samples_outside_the_allowed_set(params, candidates, monkeypatch):
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", candidates)
    torch.manual_seed(2)
    logits = torch.randn(40) * 2
    allowed = _allowed(logits / params.temperature, params)
    draws = 3000
    out = _sample(logits.expand(draws, -1).contiguous(), [params] * draws,
                  [make_generator(s) for s in range(draws)])
    seen = set(out.token_ids)
    assert seen <= allowed
    assert seen == allowed  # every admissible token shows up in 3000 draws for these logits


def _chi_square(tokens, expected_probs):
    counts = torch.bincount(torch.tensor(tokens), minlength=len(expected_probs)).double()
    expected = expected_probs.double() * len(tokens)
    return ((counts - expected) ** 2 / expected).sum().item()


@pytest.mark.parametrize("temperature, top_k", [(1.0, -1), (0.6, -1), (1.7, -1), (0.9, 3)])
def test_sampled_distribution_matches_tempered_softmax(temperature, top_k):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    support = top_k if top_k > 0 else len(logits)
    expected = (logits[:support] / temperature).softmax(-1)  # logits are sorted: top_k is a prefix
    draws = 20000
    params = SamplingParams(temperature=temperature, top_k=top_k)
    out = _sample(logits.expand(draws, -1).contiguous(), [params] * draws,
                  [make_generator(1000 + s) for s in range(draws)])
    assert max(out.token_ids) < support
    assert _chi_square(out.token_ids, expected) < 24.3  # 7 degrees of freedom at most, p = 0.001


@pytest.mark.parametrize("device, vocab", [("cpu", 2000), pytest.param("cuda", 128256, marks=pytest.mark.gpu)])
def test_seeded_and_greedy_requests_are_batch_invariant(device, vocab):
    """The same request gives the same tokens and logprobs, bit for bit, alone or at any position
    of a batch of other requests (seeded, unseeded, greedy, any truncation)."""
    torch.manual_seed(3)
    steps = 6
    step_logits = [torch.randn(vocab, device=device) * 2 for _ in range(steps)]
    requests = [SamplingParams(seed=42, temperature=0.8, top_p=0.9, presence_penalty=0.5, logprobs=True),
                SamplingParams(seed=7, top_k=40, min_p=0.02, logprobs=True, top_logprobs=3),
                SamplingParams(temperature=0, repetition_penalty=1.2, logprobs=True)]

    def run(mine, batch_size, position):
        gen = make_generator(mine.seed, device)
        others = [make_generator(None, device) for _ in range(batch_size - 1)]
        other_params = [SamplingParams(temperature=1.5, top_k=50 * (j + 1), min_p=0.01 * j, top_p=0.5)
                        if j % 3 else SamplingParams(temperature=0) for j in range(batch_size - 1)]
        tokens, logprobs = [], []
        for step in range(steps):
            rows = torch.randn(batch_size, vocab, device=device) * 3
            rows[position] = step_logits[step]
            params = other_params[:position] + [mine] + other_params[position:]
            gens = others[:position] + [gen] + others[position:]
            outputs = [[5, 6] for _ in range(batch_size)]
            outputs[position] = list(tokens)
            out = _sample(rows, params, gens, [[1, 2, 3]] * batch_size, outputs)
            tokens.append(out.token_ids[position])
            logprobs.append((out.logprobs[position], out.top_logprobs[position]))
        return tokens, logprobs

    for mine in requests:
        alone = run(mine, 1, 0)
        assert run(mine, 1, 0) == alone
        assert run(mine, 9, 4) == alone
        assert run(mine, 64, 63) == alone
        assert mine.greedy or len(set(alone[0])) > 1


@pytest.mark.parametrize("device, vocab", [("cpu", 1000), ("cpu", 49152),
                                           pytest.param("cuda", 128256, marks=pytest.mark.gpu)])
def test_token_mask_blocks_exactly_the_cleared_bits_of_its_rows(device, vocab):
    """apply_token_mask (structured output's per-row mask; numpy unpacks it on CPU, shifts on CUDA)
    against a bit-by-bit reference: -inf where a row's bit is clear, its other logits and every
    other row untouched."""
    torch.manual_seed(5)
    logits = torch.randn(6, vocab, device=device)
    words = (vocab + 31) // 32
    bits = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32)
    bits[1] = 0
    bits[1, 3] = -2**31  # token 127 only (the sign bit)
    rows = [0, 2, 5]
    expected = logits.clone()
    for j, row in enumerate(rows):
        allowed = torch.tensor([(int(bits[j, t // 32]) >> (t % 32)) & 1 for t in range(vocab)], dtype=torch.bool)
        expected[row][~allowed.to(device)] = -math.inf
    masked = sampling.apply_token_mask(logits.clone(), sampling.TokenMask(rows, bits.to(device)))
    assert torch.equal(masked, expected)
    assert torch.isfinite(masked[2]).nonzero().flatten().tolist() == [127]
    every = sampling.apply_token_mask(logits[rows].clone(), sampling.TokenMask([0, 1, 2], bits.to(device)))
    assert torch.equal(every, expected[[0, 2, 5]])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_constrained_rows_sample_only_what_their_grammar_allows(device):
    """Structured output's path through the sampler on each device (on CUDA: the pinned bitmask's
    upload and the shift unpack): 16 rows, greedy and sampled, held to a JSON schema over random
    logits, with the vocabulary padded past the tokenizer's as in a real checkpoint. Every token is
    one the grammar accepts, and every row that finishes has written JSON that parses."""
    pytest.importorskip("xgrammar")
    import json
    import sys
    from pathlib import Path

    from llama_aot.runtime import structured_output as so

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_checkpoint import build_tokenizer

    tok = build_tokenizer()
    eos, vocab, batch = tok.token_to_id("<|eot_id|>"), 1000, 16
    outputs = so.StructuredOutputs(tok, vocab, (eos,), max_rows=batch, device=device)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
              "required": ["n", "tags"]}
    compiled = outputs.compile(so.Constraint((so.JsonSchema.of(schema, compact=True),)))
    grammars = [so.RequestGrammar(compiled) for _ in range(batch)]
    params = [SamplingParams(temperature=0) if i % 2 else SamplingParams(temperature=1.0, seed=i) for i in range(batch)]
    gens = [make_generator(p.seed, device) for p in params]
    texts, done = [[] for _ in range(batch)], [False] * batch
    torch.manual_seed(0)
    for _ in range(60):
        live = [i for i in range(batch) if not done[i]]
        if not live:
            break
        mask = outputs.masks([grammars[i] for i in live], list(range(len(live))), [False] * len(live))
        logits = torch.randn(len(live), vocab, device=device) * 3
        tokens = Sampler().sample(logits, [params[i] for i in live], [gens[i] for i in live], [[1]] * len(live),
                                  [texts[i] for i in live], mask).token_ids
        for i, token in zip(live, tokens):
            assert grammars[i].accept(token)
            done[i] = token == eos
            texts[i] += [] if done[i] else [token]
    assert sum(done) >= batch // 2
    assert all(set(json.loads(tok.decode(t))) == {"n", "tags"} for t, d in zip(texts, done) if d)


def test_different_seeds_give_different_streams():
    logits = torch.zeros(8, 1000)
    out = _sample(logits, [SamplingParams()] * 8, [make_generator(s) for s in range(8)])
    assert len(set(out.token_ids)) > 1
    again = _sample(logits, [SamplingParams()] * 8, [make_generator(s) for s in range(8)])
    assert again.token_ids == out.token_ids


def test_logprobs_are_processed_log_softmax_and_sorted():
    torch.manual_seed(4)
    logits = torch.randn(3, 300)
    params = [SamplingParams(temperature=0, logprobs=True, top_logprobs=5),
              SamplingParams(temperature=0.7, top_k=10, logprobs=True, top_logprobs=20, seed=5),
              SamplingParams(temperature=0.7, top_logprobs=0)]
    out = _sample(logits, params, [None, make_generator(5), make_generator(6)])
    for i, temperature in ((0, 1.0), (1, 0.7)):
        reference = (logits[i] / temperature).log_softmax(-1)
        token = out.token_ids[i]
        assert out.logprobs[i] == pytest.approx(reference[token].item(), abs=1e-5)
        top = out.top_logprobs[i]
        assert len(top) == params[i].top_logprobs
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert values[0] == pytest.approx(reference.max().item(), abs=1e-5)
        for token_id, value in top:
            assert value == pytest.approx(reference[token_id].item(), abs=1e-5)
    assert out.top_logprobs[0][0][0] == out.token_ids[0]  # greedy picked the most likely
    assert out.logprobs[2] is None and out.top_logprobs[2] is None
    just_chosen = _sample(logits[:1], [SamplingParams(logprobs=True)], [make_generator(0)])
    assert just_chosen.top_logprobs == [[]] and math.isfinite(just_chosen.logprobs[0])


def test_logprobs_follow_penalties():
    logits = torch.tensor([[3.0, 1.0, 0.5]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=True)
    out = _sample(logits, [p], prompts=[[0]])
    expected = torch.tensor([1.5, 1.0, 0.5]).log_softmax(-1)
    assert out.token_ids == [0]
    assert out.logprobs[0] == pytest.approx(expected[0].item(), abs=1e-6)


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="2 logit rows but 1 params"):
        Sampler().sample(torch.zeros(2, 4), [SamplingParams()], [None], [[]], [[]])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 4\)"):
        Sampler().sample(torch.zeros(1, 4), [SamplingParams(presence_penalty=1)], [None], [[]], [[4]])


def test_make_generator_seeds():
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    c, d = make_generator(None), make_generator(None)
    assert not torch.equal(torch.rand(4, generator=c), torch.rand(4, generator=d))
