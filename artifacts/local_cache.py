"""Where llama-aot keeps what it makes and fetches on this machine: `$LLAMA_AOT_CACHE`, default
`~/.cache/llama-aot`. The build cache (compiler/build_cache.py), pulled artifacts
(artifacts/pull.py), the converted default checkpoint and the CPU kernels' library
(kernels/cpu_kernels.py) each take a folder of it."""
import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("LLAMA_AOT_CACHE") or Path.home() / ".cache" / "llama-aot")
