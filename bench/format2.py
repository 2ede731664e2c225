"""`python -m llama_aot.bench.format2 ARTIFACT`: rewrite a format-2 artifact's manifest as format 3,
so that builds of source trees from before format 3 can be timed against this one in one process
(bench/gpu.sh BASELINE_TREES). The runtime itself refuses format 2.

Format 2 held one program (`model.pt2`, the step ABI's inputs, `rank{r}.safetensors`) and kept the
build's input hash inside `build`; its passes had no phase, which is looked up by name in this
tree's pipeline. Only manifest.json changes: the other files and their digests stay as built.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from llama_aot.artifacts.config import BuildConfig, ModelConfig
from llama_aot.artifacts.manifest import MANIFEST_FILE, STEP_PROGRAM, Manifest, ProgramSpec, read_manifest
from llama_aot.artifacts.step_abi import STEP_INPUTS
from llama_aot.passes.pipeline import PIPELINE


def upgrade(path: Path) -> Manifest:
    old = json.loads((path / MANIFEST_FILE).read_text())
    if old.get("format_version") != 2:
        raise ValueError(f"{path}: format {old.get('format_version')}, not 2")
    build = dict(old["build"])
    input_hash = build.pop("input_hash")
    known = {f.name for f in dataclasses.fields(BuildConfig)}
    phases = {p.name: p.phase for p in PIPELINE}
    world_size = old["target"]["world_size"]
    step = ProgramSpec(STEP_PROGRAM, "model.pt2", STEP_INPUTS,
                       tuple(f"rank{r}.safetensors" for r in range(world_size)))
    manifest = Manifest(producer=old["producer"], target=old["target"], model=ModelConfig.from_dict(old["model"]),
                        build=BuildConfig.from_dict({k: v for k, v in build.items() if k in known}),
                        input_hash=input_hash, programs=(step,), quantization={},
                        passes=tuple({**p, "phase": phases[p["name"]]} for p in old["passes"]),
                        verification=old["verification"], files=old["files"])
    manifest.write(path)
    return read_manifest(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    args = p.parse_args(argv)
    manifest = upgrade(args.artifact)
    print(f"{args.artifact}: format 3, programs {[s.name for s in manifest.programs]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
