"""The checkout's top-level folders (kernels/, runtime/, ...) are installed as llama_aot.<folder>,
yet from the repository root, where `python -m` puts the root on sys.path, they are also importable
by their bare names. transformers (>= 5.25) imports the `kernels` distribution; our kernels/ must
not hide it from a user, a benchmark or the test suite started in the root."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_in_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="the kernels distribution is not installed")
def test_bare_kernels_is_the_installed_distribution_from_the_root():
    done = run_in_root("-c", "import kernels, llama_aot.kernels.ops, transformers.models.llama.modeling_llama; "
                             "print(kernels.__file__); print(hasattr(kernels, 'get_kernel'))")
    assert done.returncode == 0, done.stderr
    location, has_api = done.stdout.split()
    assert Path(location).parent != ROOT / "kernels" and has_api == "True"


def test_bare_kernels_without_the_distribution_looks_absent_to_transformers_probe():
    """transformers < 5.25 (the GPU machine's 5.17) probes `kernels` with find_spec, which finds our
    folder, then imports it; it counts a module without `__file__` or `__version__` as absent."""
    done = run_in_root("-c", "import sys; sys.path = [p for p in sys.path if 'packages' not in p]; "
                             "import kernels; print(getattr(kernels, '__file__', None), getattr(kernels, '__version__', None))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "None"]


def test_module_entry_points_run_from_the_root():
    done = run_in_root("-m", "llama_aot.bench.cli", "--help")
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr


def test_entry_points_that_import_the_passes_alone_register_the_ops_they_match():
    """A pass matches torch.ops.llama_aot nodes by name at import, so importing the pipeline first
    (as bench/format2.py does) must register the ops itself."""
    done = run_in_root("-m", "llama_aot.bench.format2", "--help")
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr
