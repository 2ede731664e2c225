"""Reading a compiled artifact, refusing one that cannot run here, and loading it.

An artifact directory holds `manifest.json`, `model.pt2` (the AOTInductor program, no weights),
`rank{r}.safetensors` (the weights under their post-pass names) and the tokenizer files. The loader
checks, in order of cost: the manifest's shape, the target and toolchain, then every file's
sha256, so a wrong artifact fails fast and a tampered one never runs. Each refusal says what to
rebuild.
"""
from __future__ import annotations

import hashlib
import json
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
MANIFEST_KEYS = ("format_version", "producer", "target", "model", "build", "passes", "verification", "files")
PROGRAM_FILE = "model.pt2"
TIED_WEIGHTS_KEY = "tied_weights"


class ArtifactError(Exception):
    """An artifact that cannot be used here, worded with what to rebuild or fix."""


def weights_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(root: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each file, in parallel: hashlib releases the GIL, and weights can be hundreds of GB."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(names, pool.map(lambda n: sha256_file(root / n), names)))


def describe_host(device_type: str) -> dict[str, Any]:
    """The target fields of the machine we run on, in the manifest's terms.

    For CPU the arch includes the vector ISA Inductor generated code for: a package built for
    AVX-512 dies with SIGILL on a machine without it, so it is part of the target."""
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return {"device_type": "cuda", "arch": f"sm_{major}{minor}", "device_name": torch.cuda.get_device_name()}
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = str(pick_vec_isa()) or "scalar"
    return {"device_type": "cpu", "arch": f"{platform.machine()}-{isa}", "device_name": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_supports(arch: str) -> bool:
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    machine, _, isa = arch.partition("-")
    return machine == platform.machine() and (isa == "scalar" or isa in {str(i) for i in valid_vec_isa_list()})


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{path}: not an artifact (no manifest.json); build one with llama-compile -o {path}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e}); rebuild the artifact with llama-compile") from None
    if not isinstance(manifest, dict) or sorted(manifest) != sorted(MANIFEST_KEYS):
        raise ArtifactError(f"{mpath}: manifest keys {sorted(manifest) if isinstance(manifest, dict) else '?'} "
                            f"are not the expected {sorted(MANIFEST_KEYS)}; rebuild the artifact")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format {manifest['format_version']}, this runtime reads format "
                            f"{FORMAT_VERSION}; rebuild it with this version of llama-compile")
    return manifest


def check_target(path: Path, manifest: dict[str, Any], device_type: str) -> None:
    target, producer = manifest["target"], manifest["producer"]
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"{path} was built for {target['device_type']} but this machine has no CUDA GPU; "
                            "rebuild with llama-compile --target cpu")
    if target["device_type"] != device_type:
        raise ArtifactError(f"{path} was built for {target['device_type']}, not {device_type}; "
                            f"rebuild with llama-compile --target {device_type}")
    if device_type == "cpu" and not _cpu_supports(target["arch"]):
        raise ArtifactError(f"{path} was built for CPU arch {target['arch']}, which this machine "
                            f"({describe_host('cpu')['arch']}) cannot run; rebuild it on this machine")
    if device_type == "cuda" and target["arch"] != describe_host("cuda")["arch"]:
        raise ArtifactError(f"{path} was built for {target['arch']}, this GPU is "
                            f"{describe_host('cuda')['arch']}; rebuild it on this machine")
    built, here = producer["torch"], torch.__version__
    if built.split(".")[:2] != here.split(".")[:2]:
        raise ArtifactError(f"{path} was compiled with torch {built}, this runtime has torch {here}; "
                            "rebuild the artifact with this torch")


def check_files(path: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    missing = [n for n in files if not (path / n).is_file()]
    if missing:
        raise ArtifactError(f"{path}: missing files {missing}; the artifact is incomplete, rebuild it")
    actual = hash_files(path, list(files))
    bad = [n for n, h in files.items() if actual[n] != h]
    if bad:
        raise ArtifactError(f"{path}: {', '.join(bad)} does not match the sha256 in manifest.json "
                            "(modified or corrupt); rebuild or re-download the artifact")


def load_weights(path: Path, rank: int, device: str) -> dict[str, torch.Tensor]:
    """The rank's weights by name, with tied names restored as the same tensor."""
    from safetensors import safe_open

    with safe_open(str(path / weights_file(rank)), framework="pt", device=device) as f:
        weights = {name: f.get_tensor(name) for name in f.keys()}
        tied = json.loads((f.metadata() or {}).get(TIED_WEIGHTS_KEY, "{}"))
    for alias, source in tied.items():
        weights[alias] = weights[source]
    return weights


@dataclass
class Artifact:
    """A verified artifact, loaded and ready to run: `program(*inputs, kv_cache) -> logits`.

    It owns `weights`: the program was given them as user-managed constants, so it reads their
    memory without holding a reference of its own."""

    path: Path
    manifest: dict[str, Any]
    program: Any
    weights: dict[str, torch.Tensor]

    @property
    def model_config(self):
        from llama_aot.compiler.config import ModelConfig

        return ModelConfig.from_dict(self.manifest["model"])

    @property
    def build_config(self):
        from llama_aot.compiler.config import BuildConfig

        build = {k: v for k, v in self.manifest["build"].items() if k != "input_hash"}
        return BuildConfig.from_dict(build)

    @property
    def weight_bytes(self) -> int:
        """Bytes of distinct weight tensors (tied names share one)."""
        unique = {id(t): t for t in self.weights.values()}.values()
        return sum(t.numel() * t.element_size() for t in unique)

    def __call__(self, *args):
        return self.program(*args)


def open_program(path: Path, device: str = "cpu", rank: int = 0, single_threaded: bool = False):
    """Loads the compiled program and hands it the rank's weights; no manifest checks. The build's
    verifier uses this before the manifest exists; everything else goes through `load_artifact`.
    Returns (program, weights): the caller must keep the weights alive as long as the program.
    `single_threaded` loads the program for capture in a CUDA graph."""
    import llama_aot.kernels  # noqa: F401  (the program calls torch.ops.llama_aot)

    try:
        program = torch._inductor.aoti_load_package(str(path / PROGRAM_FILE), run_single_threaded=single_threaded)
    except Exception as e:  # the loader raises RuntimeError subclasses with C++ detail
        raise ArtifactError(f"{path / PROGRAM_FILE}: cannot be loaded ({str(e).splitlines()[0]}); "
                            "rebuild the artifact on this machine") from None
    weights = load_weights(path, rank, device)
    needed = program.get_constant_fqns()
    missing = [n for n in needed if n not in weights]
    if missing:
        raise ArtifactError(f"{path / weights_file(rank)} lacks weights {missing[:5]}; rebuild the artifact")
    program.load_constants({n: weights[n] for n in needed}, check_full_update=True, user_managed=True)
    return program, weights


def load_artifact(path: str | Path, device: str | None = None, rank: int = 0,
                  single_threaded: bool = False) -> Artifact:
    """Checks and loads an artifact onto `device` (default: the device type it was built for)."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    manifest = read_manifest(path)
    device = device or manifest["target"]["device_type"]
    check_target(path, manifest, device)
    check_files(path, manifest)
    program, weights = open_program(path, device, rank, single_threaded)
    return Artifact(path=path, manifest=manifest, program=program, weights=weights)
