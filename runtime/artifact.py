"""Reading a compiled artifact, refusing one that cannot run here, and loading it.

An artifact directory holds `manifest.json`, `model.pt2` (the AOTInductor program, no weights),
`rank{r}.safetensors` (the weights under their post-pass names) and the tokenizer files. The loader
checks, in order of cost: the manifest's shape, the target and toolchain, then every file's
digest, so a wrong artifact fails fast and a tampered one never runs. Each refusal says what to
rebuild. The manifest's `files` map each name to a chunked sha256 (weights_loader's docstring has
the format): small files are hashed up front, and the rank's weights file is verified as it is
streamed into memory, so its bytes are read from disk once.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama_aot.runtime.weights_loader import DigestMismatch, file_matches, hash_file, load_safetensors

FORMAT_VERSION = 2
MANIFEST_KEYS = ("format_version", "producer", "target", "model", "build", "passes", "verification", "files")
PROGRAM_FILE = "model.pt2"
TIED_WEIGHTS_KEY = "tied_weights"


class ArtifactError(Exception):
    """An artifact that cannot be used here, worded with what to rebuild or fix."""


def weights_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def hash_files(root: Path, names: list[str]) -> dict[str, dict]:
    """The manifest's `files`: each file's chunked digest, its chunks hashed in parallel."""
    return {name: hash_file(root / name) for name in names}


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


def check_files(path: Path, manifest: dict[str, Any], streamed: frozenset[str] = frozenset()) -> None:
    """Every file is present and, except the `streamed` ones (verified as they load), matches."""
    files = manifest["files"]
    missing = [n for n in files if not (path / n).is_file()]
    if missing:
        raise ArtifactError(f"{path}: missing files {missing}; the artifact is incomplete, rebuild it")
    bad = [n for n, entry in files.items() if n not in streamed and not file_matches(path / n, entry)]
    if bad:
        raise ArtifactError(_mismatch(path, bad))


def _mismatch(path: Path, names: list[str]) -> str:
    return (f"{path}: {', '.join(names)} does not match the sha256 in manifest.json "
            "(modified or corrupt); rebuild or re-download the artifact")


def load_weights(path: Path, rank: int, device: str, expected: dict | None = None) -> dict[str, torch.Tensor]:
    """The rank's weights by name, with tied names restored as the same tensor. With `expected`
    (the file's manifest entry) they are returned only if the file matches it."""
    name = weights_file(rank)
    try:
        weights, metadata = load_safetensors(path / name, device, expected)
    except DigestMismatch:
        raise ArtifactError(_mismatch(path, [name])) from None
    except ValueError as e:
        raise ArtifactError(f"{e}; rebuild the artifact") from None
    tied = json.loads(metadata.get(TIED_WEIGHTS_KEY, "{}"))
    for alias, source in tied.items():
        weights[alias] = weights[source]
    return weights


@dataclass
class Artifact:
    """A verified artifact, loaded and ready to run: `program(*inputs, kv_cache) -> logits`.

    It owns `weights`: the program was given them as user-managed constants, so it reads their
    memory without holding a reference of its own. `load_seconds` splits the load into its stages
    (checking the other files, loading the program, reading the weights), which start-up reports."""

    path: Path
    manifest: dict[str, Any]
    program: Any
    weights: dict[str, torch.Tensor]
    load_seconds: dict[str, float] = field(default_factory=dict)

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
    def device_type(self) -> str:
        """The device type it was built for, and loaded onto unless the caller chose another."""
        return self.manifest["target"]["device_type"]

    @property
    def weight_bytes(self) -> int:
        """Bytes of distinct weight tensors (tied names share one)."""
        unique = {id(t): t for t in self.weights.values()}.values()
        return sum(t.numel() * t.element_size() for t in unique)

    def __call__(self, *args):
        return self.program(*args)


def _load_program(pt2: Path, single_threaded: bool):
    """AOTInductor's package loader, called directly rather than through `aoti_load_package`.

    That wrapper first compares the host with the build's metadata, only to log a warning on a
    mismatch, and reads the host's CPU vector ISA to do so: torch 2.11 compiles a probe per ISA the
    CPU flags claim and runs each in a child `python -c "import torch; ..."`, and its AMX probes run
    even with `cpp.vec_isa_ok` set. On the GPU machine the wrapper took 44 s for a 2 MB package,
    and 24-30 s with `vec_isa_ok` set; the C++ loader itself only unzips the package and opens the
    library. `check_target` has already refused a program this host cannot run (the GPU arch for
    CUDA, the vector ISA for CPU), so the comparison adds nothing."""
    from torch._inductor.package import AOTICompiledModel

    return AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(pt2), "model", single_threaded, 1, -1))


def open_program(path: Path, device: str = "cpu", rank: int = 0, single_threaded: bool = False,
                 expected: dict | None = None, seconds: dict[str, float] | None = None):
    """Loads the compiled program and hands it the rank's weights, verified against `expected`
    (their manifest entry) when given; no other checks. The build's verifier uses this before the
    manifest exists; everything else goes through `load_artifact`. Returns (program, weights): the
    caller must keep the weights alive as long as the program. `single_threaded` loads the program
    for capture in a CUDA graph. `seconds`, when given, receives the program's and the weights'
    load times."""
    import llama_aot.kernels  # noqa: F401  (the program calls torch.ops.llama_aot)

    seconds = {} if seconds is None else seconds
    start = time.perf_counter()
    try:
        program = _load_program(path / PROGRAM_FILE, single_threaded)
    except Exception as e:  # the loader raises RuntimeError subclasses with C++ detail
        raise ArtifactError(f"{path / PROGRAM_FILE}: cannot be loaded ({str(e).splitlines()[0]}); "
                            "rebuild the artifact on this machine") from None
    seconds["program"] = time.perf_counter() - start
    start = time.perf_counter()
    weights = load_weights(path, rank, device, expected)
    needed = program.get_constant_fqns()
    missing = [n for n in needed if n not in weights]
    if missing:
        raise ArtifactError(f"{path / weights_file(rank)} lacks weights {missing[:5]}; rebuild the artifact")
    program.load_constants({n: weights[n] for n in needed}, check_full_update=True, user_managed=True)
    seconds["weights"] = time.perf_counter() - start
    return program, weights


def checked_manifest(path: Path, device: str | None = None) -> tuple[dict[str, Any], str]:
    """The manifest of the artifact at `path` and the device it will run on (default: the device
    type it was built for), once this machine is known to run it; reads no other file."""
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    manifest = read_manifest(path)
    device = device or manifest["target"]["device_type"]
    check_target(path, manifest, device)
    return manifest, device


def load_artifact(path: str | Path, device: str | None = None, rank: int = 0,
                  single_threaded: bool = False) -> Artifact:
    """Checks and loads an artifact onto `device` (default: the device type it was built for)."""
    path = Path(path)
    manifest, device = checked_manifest(path, device)
    if weights_file(rank) not in manifest["files"]:
        raise ArtifactError(f"{path}: manifest.json lists no {weights_file(rank)}; rebuild the artifact")
    every_rank = frozenset(weights_file(r) for r in range(manifest["target"]["world_size"]))
    start = time.perf_counter()
    check_files(path, manifest, streamed=every_rank)  # each rank verifies its own weights as it loads them
    seconds = {"files": time.perf_counter() - start}
    program, weights = open_program(path, device, rank, single_threaded, manifest["files"][weights_file(rank)],
                                    seconds)
    return Artifact(path=path, manifest=manifest, program=program, weights=weights, load_seconds=seconds)
