"""`llama-bench decode` on the tiny CPU artifact: one artifact or several in alternation, the paired
comparison that says whether a change is beyond the rounds' scatter, and bad input as one line."""
import dataclasses
import json
import time

import pytest

from llama_aot.bench import cli
from llama_aot.bench.decode import measure_decode
from llama_aot.bench.paired import paired_difference
from llama_aot.runtime.artifact import load_artifact


def test_paired_difference_separates_a_shift_from_scatter():
    rounds = [10.0, 10.2, 9.9, 10.1, 10.3, 9.8, 10.0]
    shifted = paired_difference(rounds, [t + 1 + 0.05 * (i % 2) for i, t in enumerate(rounds)])
    assert shifted.median == pytest.approx(1.0)
    assert shifted.p_value == 2 / 2 ** 7 and shifted.verdict() == "slower"  # only all-same-sign flips reach it
    assert paired_difference([t + 1 for t in rounds], rounds).verdict() == "faster"
    swapped = paired_difference([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2.0, 1.0, 4.0, 3.0, 6.0, 5.0])  # same times
    assert swapped.median == 0 and swapped.p_value == 1 and "no difference" in swapped.verdict()


def test_one_disturbed_round_does_not_make_a_difference():
    """Rounds that scatter both ways and one that something else on the machine slowed 25x."""
    rounds = [-0.076, -0.001, 0.001, -0.002, 0.002, -0.0015, 0.0015, -0.003, 0.003, 0.0005]
    assert "no difference" in paired_difference([0.0] * 10, rounds).verdict()


def test_too_few_rounds_never_claim_a_difference():
    """Four rounds all one way are 2 of the 16 sign patterns: p = 0.125 however large the gap."""
    assert paired_difference([1.0] * 4, [9.0] * 4).p_value == 0.125


def test_many_rounds_sample_the_sign_flips_reproducibly():
    base = [float(i % 3) for i in range(40)]
    other = [t + (0.5 if i % 4 else -0.4) for i, t in enumerate(base)]
    a, b = paired_difference(base, other), paired_difference(base, other)
    assert a == b and 0 < a.p_value < 0.05 and a.verdict() == "slower"


@pytest.mark.parametrize("base, other, message", [([1.0, 2.0], [1.0], "differ in number"),
                                                  ([1.0], [2.0], "at least 2 rounds")])
def test_paired_difference_refuses_rounds_it_cannot_pair(base, other, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(base, other)


def test_a_slower_artifact_is_told_apart(tiny_artifact):
    """The same program, once with 50 ms added to each step: every round must see it slower, the
    median by about the 50 ms, and 6 rounds are the fewest in which the test can call it slower.
    (CI runs this beside the default model's background builds, whose load moves a round by up to
    ~40 ms: one round of a CI run saw 12.8 ms, the others 24 to 61.)"""
    fast = load_artifact(tiny_artifact)

    def slow_program(*args):
        time.sleep(0.05)
        return fast.step(*args)

    slow = dataclasses.replace(fast, programs={**fast.programs, "step": slow_program})
    a, b = measure_decode([fast, slow], batch=1, context=8, new_tokens=4, cuda_graph=False, bandwidth=1e9, rounds=6)
    assert len(a.round_ms_per_token) == len(b.round_ms_per_token) == 6
    assert a.ms_per_token == min(a.round_ms_per_token)
    d = paired_difference(list(a.round_ms_per_token), list(b.round_ms_per_token))
    assert min(d.differences) > 0 and 25 < d.median < 150 and d.verdict() == "slower"


def test_two_artifacts_are_timed_in_rounds_and_compared(tiny_artifact, tmp_path, capsys):
    code = cli.main(["decode", "--artifact", str(tiny_artifact), "--artifact", str(tiny_artifact), "--batch", "1,2",
                     "--context", "8", "--new-tokens", "4", "--rounds", "2", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    records = json.loads(next(tmp_path.glob("decode-*.json")).read_text())
    assert [(r["batch"], "against_first" in r) for r in records] == [(1, False), (1, True), (2, False), (2, True)]
    for r in records:
        assert r["device"] == "cpu" and r["artifact"] == str(tiny_artifact) and len(r["round_ms_per_token"]) == 2
        assert r["ms_per_token"] == min(r["round_ms_per_token"]) and r["baseline"] is None
    against = records[1]["against_first"]
    assert len(against["round_differences"]) == 2 and against["p_value"] >= 0.5  # 2 rounds: 4 sign patterns
    assert against["median_ms_per_token_difference"] == pytest.approx(sum(against["round_differences"]) / 2)
    assert out.count("against #0: ") == 2 and "#1 tiny: batch" in out and "no difference beyond the rounds' scatter" in out


@pytest.mark.parametrize("extra, message", [(["--rounds", "1"], "needs --rounds of at least 2"),
                                            (["--artifact", "{missing}"], "no such artifact directory"),
                                            (["--checkpoint", "{missing}"], "needs a CUDA artifact")])
def test_bad_comparisons_are_one_line_exit_2(tiny_artifact, tmp_path, capsys, extra, message):
    extra = [e.format(missing=tmp_path / "nope") for e in extra]
    assert cli.main(["decode", "--artifact", str(tiny_artifact), "--artifact", str(tiny_artifact), *extra,
                     "--new-tokens", "2", "--context", "4", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
