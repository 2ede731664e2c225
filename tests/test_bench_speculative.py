"""`llama-bench speculative` (bench/speculative.py) on the tiny EAGLE artifact (conftest's, a random
head over the tiny target): the end-to-end part reports every number of draft steps with greedy
tokens identical to those without speculation, and flags a run whose tokens differ; the step-cost
part reports each cost and the projection by its formula; bad input is one line and status 2; and
bench/random_checkpoint.py's random head reads back as llama-compile reads a head."""
from __future__ import annotations

import json

import pytest
import torch

from llama_aot.bench import cli, speculative
from llama_aot.bench.speculative import PROJECTION, Generated

CONVERSATIONS = ["Tell me about the quick brown fox.", "How are you today?", "Write a tiny program.",
                 "What is a compiler?", "Say hello to the world.", "Count from one to ten."]


@pytest.fixture
def sharegpt(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]}
                                for text in CONVERSATIONS]))
    return path


def saved(out_dir, kind):
    (path,) = out_dir.glob(f"{kind}-*.json")
    return json.loads(path.read_text())


def test_end_to_end_reports_each_number_of_draft_steps(tiny_eagle_artifact, sharegpt, tmp_path, capsys):
    out = tmp_path / "results"
    code = speculative.main(["--artifact", str(tiny_eagle_artifact), "--steps", "1,3", "--num-prompts", "3",
                             "--new-tokens", "8", "--ignore-eos", "--dataset-path", str(sharegpt),
                             "--skip-conversations", "2", "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    records = saved(out, "speculative")
    assert [r["steps"] for r in records] == [0, 1, 3]  # K = 0, the baseline, always measured
    for r in records:
        assert r["device"] == "cpu" and r["git_sha"] and r["batch"] == 1 and r["build_speculative_num_steps"] == 3
        assert r["prompts"] == 3 and r["output_tokens"] == 24 and len(r["prompt_ms_per_token"]) == 3
        assert r["identical_to_no_speculation"] and r["mismatched_prompts"] == []
        assert r["ms_per_token"] > 0 and r["tokens_per_s"] == pytest.approx(1e3 / r["ms_per_token"])
        assert r["speedup"] == pytest.approx(records[0]["ms_per_token"] / r["ms_per_token"])
    assert records[0]["accept_length"] is None and records[0]["verify_steps"] == 0
    for r in records[1:]:
        assert 1.0 <= r["accept_length"] <= r["steps"] + 1 and r["verify_steps"] > 0
        assert 0 <= r["against_no_speculation"]["p_value"] <= 1
    assert "K=3:" in printed and "greedy tokens identical" in printed


def generated(*token_lists):
    return [Generated(tuple(t), 0.0, 1.0, 2.0) for t in token_lists]


def test_tokens_that_differ_from_the_baseline_are_flagged():
    base = {"requests": generated([1, 2, 3], [4, 5]), "verify_steps": 0, "accepted_drafts": 0}
    other = {"requests": generated([1, 2, 3], [4, 6]), "verify_steps": 2, "accepted_drafts": 1}
    records = speculative.summarize({0: base, 2: other})
    assert records[0]["identical_to_no_speculation"]
    assert not records[1]["identical_to_no_speculation"] and records[1]["mismatched_prompts"] == [1]
    assert records[1]["accept_length"] == 1.5 and "against_no_speculation" not in records[1]


def test_step_costs_and_the_projection(tiny_eagle_artifact, tmp_path, capsys):
    out = tmp_path / "results"
    code = cli.main(["speculative", "--artifact", str(tiny_eagle_artifact), "--step-costs", "--steps", "1,3",
                     "--context", "20", "--repeats", "2", "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    records = saved(out, "speculative-step-costs")
    assert [r["steps"] for r in records] == [1, 3]
    for r in records:
        k, projection = r["steps"], r["projection"]
        assert r["context"] == 20 and r["device"] == "cpu"
        assert min(r["decode_ms"], r["verify_ms"], r["draft_ms"]) > 0
        assert r["draft_ms"] == pytest.approx(r["drafts_ms"] / k)
        assert len(r["round_ms"][f"verify {k}"]) == 2
        assert projection["formula"] == PROJECTION
        assert list(projection["speedup_at_accept_length"]) == [str(a) for a in (2, 3, 4) if a <= k + 1]
        for a, x in projection["speedup_at_accept_length"].items():
            assert x == pytest.approx(int(a) * r["decode_ms"] / (r["verify_ms"] + k * r["draft_ms"]))
    assert "projection, not a measurement" in printed


@pytest.mark.parametrize("flags, needle", [
    (["--steps", "9"], "give numbers of draft steps from 0 to 8"),
    (["--step-costs", "--context", "100000"], "--context 100000: a verify step and 5 drafts after it must fit"),
    (["--step-costs", "--steps", "0"], "give --steps with a number of draft steps above 0"),
    (["--num-prompts", "50", "--dataset-path", "SHAREGPT"], "only 6 ShareGPT prompts after the first 0"),
])
def test_bad_input_is_one_line_and_status_2(tiny_eagle_artifact, sharegpt, capsys, flags, needle):
    flags = [str(sharegpt) if f == "SHAREGPT" else f for f in flags]
    try:
        code = cli.main(["speculative", "--artifact", str(tiny_eagle_artifact), *flags])
    except SystemExit as e:  # argparse's errors exit from inside parse_args
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_an_artifact_without_a_draft_program_is_refused(tiny_artifact, capsys):
    assert cli.main(["speculative", "--artifact", str(tiny_artifact), "--step-costs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("no draft program; build it with llama-compile --speculative-algorithm EAGLE3 "
                        "--speculative-draft-model-path HEAD_DIR") and len(err.splitlines()) == 1


def test_the_random_head_reads_back_as_llama_compile_reads_it(tiny_checkpoint, tmp_path, monkeypatch):
    """The tiny vocabulary (512) is below the 32,000 draft ids, so the head drafts over all of it
    (no d2t, as the trainer writes it); with a smaller draft vocabulary it carries d2t. Given an
    existing checkpoint, the CLI writes the head only."""
    from llama_aot.bench import random_checkpoint
    from llama_aot.compiler import train_eagle_cli
    from llama_aot.compiler.checkpoint import open_checkpoint
    from llama_aot.compiler.eagle_head import default_aux_layers, read_head

    target = open_checkpoint(tiny_checkpoint).config
    before = {p.name: p.stat().st_mtime_ns for p in tiny_checkpoint.iterdir()}
    random_checkpoint.main([str(tiny_checkpoint), "--eagle-head", str(tmp_path / "whole")])
    assert {p.name: p.stat().st_mtime_ns for p in tiny_checkpoint.iterdir()} == before
    config, tensors = read_head(tmp_path / "whole", target)
    assert config.draft_vocab_size == target.vocab_size and "d2t" not in tensors
    assert config.aux_layers == default_aux_layers(target.num_layers)
    assert tensors["lm_head.weight"].dtype == tensors["fc.weight"].dtype == torch.bfloat16

    monkeypatch.setattr(train_eagle_cli, "DEFAULT_DRAFT_VOCAB", 100)
    config, tensors = read_head(random_checkpoint.write_random_head(tiny_checkpoint, tmp_path / "part"), target)
    assert config.draft_vocab_size == 100 and tensors["d2t"].tolist() == [0] * 100
