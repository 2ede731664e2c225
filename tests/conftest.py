"""Session-wide fixtures: each test model is converted and compiled once per pytest session.

Builds go through the real build cache, pointed at a session temporary directory unless
LLAMA_AOT_CACHE is already set (set it to reuse compiled test models across local runs). The
temporary cache holds about 1 GB of compiled models and is removed when the session ends: left
behind, a hundred runs filled the CI machine's disk.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

TINY_BUILD = dict(max_num_tokens=64, max_num_seqs=8, context_length=256, block_size=4)
_SESSION_CACHE: list[str] = []  # the build cache this session made, if it made one


def pytest_configure(config):
    if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU-only machines
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not os.environ.get("LLAMA_AOT_CACHE"):
        import tempfile

        os.environ["LLAMA_AOT_CACHE"] = tempfile.mkdtemp(prefix="llama-aot-test-cache-")
        _SESSION_CACHE.append(os.environ["LLAMA_AOT_CACHE"])


def pytest_unconfigure(config):
    for path in _SESSION_CACHE:
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
def smollm2_checkpoint() -> Path:
    from llama_aot.compiler.gguf_import import default_checkpoint

    return default_checkpoint()


@pytest.fixture(scope="session")
def smollm2_artifact(smollm2_checkpoint, tmp_path_factory) -> Path:
    """The embedded default, built with llama-compile's defaults, as `make serve` builds it."""
    from llama_aot.artifacts.config import BuildConfig
    from llama_aot.compiler.build import build_artifact

    out = tmp_path_factory.mktemp("artifacts") / "smollm2"
    build_artifact(smollm2_checkpoint, BuildConfig(), out)
    return out


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
