"""The CPU target's hand-written kernels (kernels/cpu_paged_attention.cpp), compiled for the machine
that first needs them and loaded into the dispatcher as `torch.ops.llama_aot.paged_attention_cpu`.

Why C++: on CPU, Inductor compiles the attention reference (kernels/paged_attention.py) into a
loop that gathers each sequence's keys and values element by element, with an index computation
and a bounds check each, before the matmuls read them again: ~3 ns per cached value on the 2-core
CI machine, a quarter of a SmolLM2 step at context 128 and most of it at 8K (docs/cpu.md). No
library reads a paged cache on the CPU: torch's CPU attention (SDPA, flex attention's CPU
template) takes contiguous keys and values. The C++ kernel streams every page once, in place.

The op is opaque to Inductor: an artifact calls it through the dispatcher (AOTInductor's proxy
executor), so every process that runs such an artifact loads the library first; the runtime's
artifact loader does so for CPU artifacts (`load()`). The library is built with the compiler
AOTInductor uses (`$CXX`, else `g++`), torch's headers and `-O3 -march=native` into
`$LLAMA_AOT_CACHE/cpu-kernels/` (default `~/.cache/llama-aot`), named by a hash of the source,
torch's version and the flags: ~15 s once per machine and torch, ~10 ms to load after that.

`LLAMA_AOT_CPU_KERNELS=0` turns the kernels off, at build time (the program then holds the
reference's torch ops) and at load time; without a compiler the reference is used too.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import zipfile
from pathlib import Path

import torch

from llama_aot.artifacts.local_cache import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_paged_attention.cpp")
OP = "llama_aot::paged_attention_cpu"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")

torch.library.define(
    OP,
    "(Tensor q, Tensor kv_cache, int layer, Tensor block_tables, Tensor context_lens, Tensor query_index, "
    "Tensor positions, float scale, Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor")


@torch.library.register_fake(OP)
def _paged_attention_cpu_fake(q, kv_cache, layer, block_tables, context_lens, query_index, positions, scale,
                              k_scale=None, v_scale=None):
    return torch.empty_like(q)


class CpuKernelsUnavailable(RuntimeError):
    """The C++ kernels could not be built or loaded here; the message says why."""


_lock = threading.Lock()
_loaded: Path | None = None
_failure: str | None = None
_warned = False


def enabled() -> bool:
    return os.environ.get("LLAMA_AOT_CPU_KERNELS", "1") != "0"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX") or "g++")


def library_path(compiler: str) -> Path:
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), torch.__version__.encode(), compiler.encode(),
                                     " ".join(FLAGS).encode()])).hexdigest()[:16]
    return cache_root() / "cpu-kernels" / f"llama_aot_cpu_{key}.so"


def _build(compiler: str, out: Path) -> None:
    """Compiles into a temporary file beside `out` and renames it into place, so that a build cut
    short, or two processes building at once, never leave a half-written library."""
    from torch.utils import cpp_extension

    out.parent.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so.tmp", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        cmd = [compiler, *FLAGS, abi, *includes, str(SOURCE), "-o", str(partial), *libs, "-lc10", "-ltorch_cpu"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise CpuKernelsUnavailable(f"compiling {SOURCE.name} failed: {done.stderr.strip()[-2000:]}")
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)


def load() -> Path:
    """Builds (first use on this machine) and loads the library; returns its path. Raises
    CpuKernelsUnavailable, with the reason, where it cannot, or when the kernels are turned off."""
    global _loaded, _failure
    if not enabled():
        raise CpuKernelsUnavailable("LLAMA_AOT_CPU_KERNELS=0 turns the C++ CPU kernels off")
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise CpuKernelsUnavailable(_failure)
        compiler = _compiler()
        if compiler is None:
            _failure = f"no C++ compiler ({os.environ.get('CXX') or 'g++'}) to build the CPU kernels"
            raise CpuKernelsUnavailable(_failure)
        path = library_path(compiler)
        try:
            if not path.exists():
                print(f"[llama-aot] building the C++ CPU kernels for this machine into {path.parent} "
                      "(once, ~15 s) ...", file=sys.stderr, flush=True)
                _build(compiler, path)
            torch.ops.load_library(str(path))
        except (CpuKernelsUnavailable, OSError, RuntimeError) as e:
            _failure = str(e)
            raise CpuKernelsUnavailable(_failure) from e
        _loaded = path
        return path


def available() -> bool:
    """Whether the C++ kernels are loaded, building and loading them if they can be; the reason
    they cannot is logged once."""
    global _warned
    try:
        load()
    except CpuKernelsUnavailable as e:
        if enabled() and not _warned:
            _warned = True
            log.warning("the CPU attention falls back to the torch reference: %s", e)
        return False
    return True


def called_by(package: Path) -> bool:
    """Whether an AOTInductor package calls the C++ attention: its wrapper's JSON lists the ops it
    runs through the dispatcher."""
    try:
        with zipfile.ZipFile(package) as z:
            return any(OP.encode() in z.read(name) for name in z.namelist() if name.endswith(".wrapper.json"))
    except (OSError, zipfile.BadZipFile):
        return False  # not a package: the loader that follows says so
