"""`llama-bench cpu`: HF eager, the program alone and llama-serve measured in one run, saved as one
JSON record; and its refusals."""
import json

from llama_aot.bench import cli


def test_one_run_measures_hf_the_program_and_the_server(tiny_checkpoint, tiny_artifact, tmp_path, capsys):
    assert cli.main(["cpu", "--artifact", str(tiny_artifact), "--checkpoint", str(tiny_checkpoint),
                     "--new-tokens", "8", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "HF transformers eager float32" in out and "served: median TPOT" in out
    [path] = tmp_path.glob("cpu-default-*.json")
    [record] = json.loads(path.read_text())
    # The tiny build holds 256 tokens: 8192 is cut to the longest context it can decode 8 more at.
    assert sorted(record["program"], key=int) == ["128", "248"]
    assert record["served"]["requests"] == 4 and record["served"]["output_tokens"] == 4 * 8
    # One round of the program per served request: every context timed as often as the server.
    assert [len(record["program"][c]["round_ms_per_token"]) for c in ("128", "248")] == [4, 4]
    assert record["served_vs_hf_eager"] == record["hf_eager_float32"]["ms_per_token"] / record["served"]["median_tpot_ms"]
    assert record["long_over_short_context"] > 0 and record["cpu_capability"]


def test_a_missing_artifact_or_checkpoint_is_one_line_exit_2(tiny_artifact, tmp_path, capsys):
    assert cli.main(["cpu", "--artifact", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama-bench: error:") and "nope" in err and "Traceback" not in err
    assert cli.main(["cpu", "--artifact", str(tiny_artifact), "--checkpoint", str(tmp_path)]) == 2
    assert "not an HF checkpoint" in capsys.readouterr().err
