"""`llama-bench accuracy` on the tiny random Llama 3.1: the float32 artifact must agree with HF
transformers token for token and in perplexity; against a baseline artifact, itself must agree
exactly and the FP8 build must differ by FP8's rounding alone; bad paths and bad pairs must be
one-line errors."""
import dataclasses
import io
import json
import random
import shutil

import pytest
import torch

from llama_aot.bench import cli
from llama_aot.compiler.build import Progress, build_artifact

TEXTS = ["--prompts", "3", "--new-tokens", "8", "--ppl-texts", "3", "--max-len", "100"]
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
    code = cli.main(["accuracy", "--artifact", str(tiny_artifact), "--checkpoint", str(tiny_checkpoint), *TEXTS,
                     "--dataset-path", str(_dataset(tmp_path)), "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    [record] = json.loads(next((tmp_path / "out").glob("accuracy-*.json")).read_text())
    assert record["greedy_agreement"] == 1.0 and record["prompts"] == 3 and record["new_tokens"] == 8
    assert record["identical_continuations"] == 3 and record["logits_relative_error"] < 1e-4
    assert abs(record["perplexity_relative_change"]) < 1e-4 and record["perplexity_hf"] > 1
    assert record["reference"] == "hf" and record["checkpoint"] == str(tiny_checkpoint)
    assert "identical greedy continuations: 3/3" in out and "perplexity on 3 held-out" in out


def test_missing_artifact_is_one_line_exit_2(tiny_checkpoint, tmp_path, capsys):
    assert cli.main(["accuracy", "--artifact", str(tmp_path / "nope"), "--checkpoint", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "no such artifact directory" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def fp8_artifact(tiny_checkpoint, tiny_build, tmp_path_factory):
    """`llama-compile --fp8` of the tiny checkpoint, compiled once for this module's tests."""
    out = tmp_path_factory.mktemp("artifacts") / "tiny-fp8"
    build_artifact(tiny_checkpoint, dataclasses.replace(tiny_build, weight_quant="fp8", passes=None), out,
                   Progress(io.StringIO()))
    return out


def _against_baseline(artifact, baseline, tmp_path, capsys, name):
    out_dir = tmp_path / name
    assert cli.main(["accuracy", "--artifact", str(artifact), "--baseline", str(baseline), *TEXTS,
                     "--dataset-path", str(_dataset(tmp_path)), "--out-dir", str(out_dir)]) == 0, capsys.readouterr()
    [record] = json.loads(next(out_dir.glob("accuracy-*.json")).read_text())
    return record, capsys.readouterr().out


def test_an_artifact_against_itself_as_baseline_is_exact(tiny_artifact, tmp_path, capsys):
    record, out = _against_baseline(tiny_artifact, tiny_artifact, tmp_path, capsys, "self")
    assert record["reference"] == "artifact" and record["baseline"] == str(tiny_artifact)
    assert record["greedy_agreement"] == 1.0 and record["identical_continuations"] == 3
    assert record["logits_relative_error"] == 0 and record["perplexity_relative_change"] == 0
    assert record["perplexity_artifact"] == record["perplexity_baseline"] > 1
    assert "agreement with baseline" in out and "identical greedy continuations: 3/3" in out


def test_fp8_against_the_unquantized_baseline(tiny_checkpoint, tiny_artifact, fp8_artifact, tmp_path, capsys):
    """The FP8 artifact's logits differ from the unquantized one's by e4m3's rounding, and both
    perplexities are what HF computes with the weights unrounded and rounded as --fp8 rounds them."""
    from transformers import LlamaForCausalLM

    from llama_aot.bench.accuracy import sample_prompts_and_texts
    from llama_aot.bench.datasets import load_tokenizer
    from llama_aot.bench.fp8_sensitivity import decoder_matmuls, score
    from llama_aot.kernels.fp8_linear import dequantize_rows, quantize_rows

    record, out = _against_baseline(fp8_artifact, tiny_artifact, tmp_path, capsys, "fp8")
    assert record["reference"] == "artifact" and record["baseline"] == str(tiny_artifact)
    assert (record["weight_quant"], record["kv_dtype"]) == ("fp8", "float32")
    assert (record["baseline_weight_quant"], record["baseline_kv_dtype"]) == ("none", "float32")
    assert 0 < record["greedy_agreement"] <= 1 and 0 < record["logits_relative_error"] < 0.5

    model = LlamaForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32).eval()
    _, texts = sample_prompts_and_texts(load_tokenizer(tiny_checkpoint), _dataset(tmp_path), 0, 3, 3, 100)
    originals = {n: m.weight.data for n, m in decoder_matmuls(model).items()}
    rounded = {n: dequantize_rows(*quantize_rows(w), w.dtype) for n, w in originals.items()}
    assert abs(record["perplexity_baseline"] / score(model, originals, rounded, set(), texts) - 1) < 1e-4
    assert abs(record["perplexity_artifact"] / score(model, originals, rounded, set(rounded), texts) - 1) < 1e-4
    change = (record["perplexity_artifact"] - record["perplexity_baseline"]) / record["perplexity_baseline"]
    assert record["perplexity_relative_change"] == pytest.approx(change) and change != 0
    assert f"baseline {record['perplexity_baseline']:.4f}" in out


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint", "ckpt", "--baseline", "base"], "not allowed with argument"),
    ([], "one of the arguments --checkpoint --baseline is required"),
])
def test_exactly_one_reference_is_a_one_line_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["accuracy", "--artifact", "art", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def _other_model(manifest):
    manifest["model"]["rms_norm_eps"] *= 10


def _other_tokenizer(tokenizer):
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]


@pytest.mark.parametrize("file, edit, message", [
    ("manifest.json", _other_model, "is another model (rms_norm_eps"),
    ("tokenizer.json", _other_tokenizer, "has another tokenizer"),
])
def test_a_baseline_of_another_model_is_refused(tiny_artifact, tmp_path, capsys, file, edit, message):
    other = tmp_path / "other"
    shutil.copytree(tiny_artifact, other)
    data = json.loads((other / file).read_text())
    edit(data)
    (other / file).write_text(json.dumps(data))
    assert cli.main(["accuracy", "--artifact", str(tiny_artifact), "--baseline", str(other)]) == 2
    err = capsys.readouterr().err
    assert message in err and "same checkpoint" in err and len(err.strip().splitlines()) == 1
