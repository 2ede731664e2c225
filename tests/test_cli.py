"""llama-compile's user-facing contract: refusals are one line on stderr with exit status 2, no
traceback, and nothing left behind (no output directory, no temporary directory)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from llama_aot.artifacts.config import BuildConfig
from llama_aot.compiler.cli import main


def assert_refused(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("llama-compile: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def assert_nothing_left(parent, name):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("flags, needle", [
    (["--tp", "0"], "--tp 0: must be a positive integer"),
    (["--fp8-lm-head"], "--fp8-lm-head quantizes the LM head along with the other weights; it needs --fp8"),
    pytest.param(["--target", "cuda"], "--target cuda needs a CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="refused only on machines without a GPU")),
    (["--max-num-tokens", "0"], "--max-num-tokens"),
    (["--block-size", "12"], "block size 12"),
])
def test_invalid_flags_are_refused(capsys, tmp_path, flags, needle):
    assert_refused(capsys, [*flags, "-o", str(tmp_path / "out")], needle)
    assert_nothing_left(tmp_path, "out")


def test_defaults_follow_the_target_and_the_flags():
    """A GPU artifact is bf16 with 2048-token, 128-sequence steps unless told otherwise, whether
    the build comes from the CLI or from Python; default sequences never outnumber tokens. (The
    config describes a build; whether this machine can run it is checked when it builds.)"""
    def sizes(**kw):
        build = BuildConfig(**kw)
        return build.dtype, build.max_num_tokens, build.max_num_seqs

    assert sizes() == ("float32", 512, 64)
    assert sizes(target="cuda") == ("bfloat16", 2048, 128)
    assert sizes(target="cuda", max_num_tokens=256) == ("bfloat16", 256, 128)
    assert sizes(target="cuda", max_num_tokens=64) == ("bfloat16", 64, 64)
    assert sizes(max_num_seqs=8, dtype="bfloat16") == ("bfloat16", 512, 8)
    assert BuildConfig(target="cuda").passes[-1] == "route_decode_linears"
    assert "route_decode_linears" not in BuildConfig().passes


def test_more_sequences_than_tokens_is_refused(capsys, tmp_path):
    assert_refused(capsys, ["--max-num-tokens", "16", "--max-num-seqs", "32", "-o", str(tmp_path / "out")],
                   "--max-num-seqs 32", "--max-num-tokens (16)")
    assert_nothing_left(tmp_path, "out")


def test_unknown_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--frobnicate" in err


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def test_truncated_safetensors(capsys, checkpoint_copy, tmp_path):
    shard = checkpoint_copy / "model-00002-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    assert_refused(capsys, ["--model", str(checkpoint_copy), "-o", str(tmp_path / "out")],
                   "model-00002-of-00002.safetensors", "truncated")
    assert_nothing_left(tmp_path, "out")


def test_truncated_safetensors_in_a_real_process(checkpoint_copy, tmp_path):
    """The installed console script, end to end: exit 2, one line, no traceback."""
    shard = checkpoint_copy / "model-00001-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(100)
    exe = shutil.which("llama-compile", path=os.path.dirname(sys.executable))
    proc = subprocess.run([exe, "--model", str(checkpoint_copy), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("llama-compile: error: ")
    assert "model-00001-of-00002.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    assert_nothing_left(tmp_path, "out")


@pytest.mark.parametrize("corrupt, needle", [
    (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
    (lambda d: (d / "model-00001-of-00002.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}"),
     "model-00001-of-00002.safetensors"),
    (lambda d: (d / "model-00002-of-00002.safetensors").unlink(), "model-00002-of-00002.safetensors"),
    (lambda d: _edit_config(d, architectures=["MistralForCausalLM"], model_type="mistral"), "unsupported architecture"),
    (lambda d: _edit_config(d, intermediate_size=96), "shape"),
])
def test_bad_checkpoints(capsys, checkpoint_copy, tmp_path, corrupt, needle):
    corrupt(checkpoint_copy)
    assert_refused(capsys, ["--model", str(checkpoint_copy), "-o", str(tmp_path / "out")], needle)
    assert_nothing_left(tmp_path, "out")


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_checkpoint(capsys, tmp_path):
    assert_refused(capsys, ["--model", str(tmp_path / "nope"), "-o", str(tmp_path / "out")], "nope")


def test_unwritable_output(capsys, tiny_checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert_refused(capsys, ["--model", str(tiny_checkpoint), "-o", str(blocker / "out")], "cannot write",
                   f"{blocker} is a file")


def test_output_that_is_not_an_artifact_is_not_replaced(capsys, tiny_checkpoint, tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert_refused(capsys, ["--model", str(tiny_checkpoint), "-o", str(precious)], "not a llama-aot artifact")
    assert (precious / "notes.txt").read_text() == "keep me"


def test_success_prints_the_summary_with_the_build_time(capsys, tiny_checkpoint, tiny_artifact, tmp_path):
    """The last line names the artifact, its target, each pass's matches and the wall time; with
    the session's tiny build already cached this is the cache-hit path."""
    from conftest import TINY_BUILD

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_BUILD.items()]
    assert main(["--model", str(tiny_checkpoint), *flags, "--dtype", "float32", "-o", str(tmp_path / "tiny")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"{tmp_path / 'tiny'}: cpu ") and "fuse_qkv=2" in last
    assert re.search(r"; built in \d+\.\d s$", last), last
