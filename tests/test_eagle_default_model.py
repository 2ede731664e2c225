"""Issue 23's greedy acceptance on the CPU: the embedded default model (SmolLM2-135M-Instruct),
built with an EAGLE-3 head that llama-train-eagle trained for it (conftest's smollm2_eagle, a
reduced run), gives the same tokens with and without speculation on 16 held-out ShareGPT prompts,
as `llama-bench speculative` measures it on the GPU."""
from __future__ import annotations

import json

from llama_aot.bench import speculative

TRAINING_CONVERSATIONS = 16  # HEAD_TRAINING's --num-prompts plus --eval-prompts (conftest.py)


def test_the_default_model_speaks_as_without_its_trained_head(smollm2_eagle, tmp_path, capsys):
    out = tmp_path / "results"
    code = speculative.main(["--artifact", str(smollm2_eagle), "--steps", "3", "--num-prompts", "16",
                             "--new-tokens", "12", "--max-prompt-tokens", "96",
                             "--skip-conversations", str(TRAINING_CONVERSATIONS),
                             "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    (path,) = out.glob("speculative-*.json")
    without, with_head = json.loads(path.read_text())
    assert (without["steps"], with_head["steps"]) == (0, 3) and with_head["prompts"] == 16
    assert with_head["identical_to_no_speculation"] and with_head["mismatched_prompts"] == []
    assert with_head["verify_steps"] > 0 and 1.0 <= with_head["accept_length"] <= 4.0
    report = json.loads((smollm2_eagle.with_name(smollm2_eagle.name + "-head") / "training_report.json").read_text())
    assert report["prompts"] == {"train": 12, "eval": 4}
