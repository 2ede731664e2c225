"""`llama-bench accuracy` on the tiny random Llama 3.1: the float32 artifact must agree with HF
transformers token for token and in perplexity, and bad paths must be one-line errors."""
import json
import random

from llama_aot.bench import cli

WORDS = "alpha beta gamma delta river stone cloud seven quiet orange lamp".split()


def _dataset(tmp_path):
    rng = random.Random(0)
    rows = [{"id": str(i), "conversations": [{"from": "human", "value": " ".join(rng.choices(WORDS, k=30))},
                                             {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=60))}]}
            for i in range(12)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows))
    return path


def test_artifact_agrees_with_hf(tiny_checkpoint, tiny_artifact, tmp_path, capsys):
    code = cli.main(["accuracy", "--artifact", str(tiny_artifact), "--checkpoint", str(tiny_checkpoint),
                     "--prompts", "3", "--new-tokens", "8", "--ppl-texts", "3", "--max-len", "100",
                     "--dataset-path", str(_dataset(tmp_path)), "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    [record] = json.loads(next((tmp_path / "out").glob("accuracy-*.json")).read_text())
    assert record["greedy_agreement"] == 1.0 and record["prompts"] == 3 and record["new_tokens"] == 8
    assert record["identical_continuations"] == 3 and record["logits_relative_error"] < 1e-4
    assert record["perplexity_relative_difference"] < 1e-4 and record["perplexity_hf"] > 1
    assert "identical greedy continuations: 3/3" in out and "perplexity on 3 held-out" in out


def test_missing_artifact_is_one_line_exit_2(tiny_checkpoint, tmp_path, capsys):
    assert cli.main(["accuracy", "--artifact", str(tmp_path / "nope"), "--checkpoint", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "no such artifact directory" in err and len(err.strip().splitlines()) == 1
