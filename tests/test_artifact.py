"""The artifact's contract: a complete format-3 manifest that lists its programs and ranks, refusal
of tampered files, older formats and foreign targets at load, and a build cache that makes an
unchanged rebuild nearly free."""
import dataclasses
import io
import json
import shutil
import time

import pytest
import torch

from llama_aot.artifacts.digest import hash_file
from llama_aot.artifacts.errors import ArtifactError
from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.manifest import KEYS, read_manifest
from llama_aot.artifacts.step_abi import STEP_INPUTS, SequenceChunk, build_step_inputs, call_step
from llama_aot.compiler.build import Progress, build_artifact, input_hash
from llama_aot.compiler.checkpoint import open_checkpoint
from llama_aot.runtime.artifact import load_artifact


def test_manifest_layout(tiny_artifact, tiny_build):
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert list(manifest) == list(KEYS) and manifest["format_version"] == 3
    assert {"version", "git_sha", "torch", "triton"} <= set(manifest["producer"])
    assert {"device_type", "arch", "device_name", "world_size"} <= set(manifest["target"])
    assert manifest["target"]["world_size"] == 1
    assert manifest["programs"] == [{"name": "step", "package": "step.pt2", "inputs": list(STEP_INPUTS),
                                     "weights": ["step.rank0.safetensors"]}]
    assert manifest["quantization"] == {}
    build = manifest["build"]
    assert (build["dtype"], build["kv_dtype"], build["tp"], build["weight_quant"]) == ("float32", "float32", 1, "none")
    assert (build["max_num_tokens"], build["block_size"], build["context_length"]) == (64, 4, 256)
    assert [(p["name"], p["phase"]) for p in manifest["passes"]] == [
        ("fuse_qkv", "fuse"), ("fuse_gate_up", "fuse"), ("fuse_add_rmsnorm", "fuse")]
    assert all(p["matches"] > 0 for p in manifest["passes"])
    assert manifest["verification"]["passed"]
    assert set(manifest["files"]) == {"step.pt2", "step.rank0.safetensors", "tokenizer.json", "tokenizer_config.json",
                                      "generation_config.json"}
    for name, entry in manifest["files"].items():
        assert hash_file(tiny_artifact / name, entry["chunk_size"]) == entry


def test_weights_are_stored_under_post_pass_names(tiny_artifact):
    from safetensors import safe_open

    with safe_open(str(tiny_artifact / "step.rank0.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.1.mlp.gate_up_proj.weight" in names
    assert not any(n.endswith(".q_proj.weight") for n in names)
    assert (tiny_artifact / "step.pt2").stat().st_size < 16 << 20  # code only, no weights inside


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path):
    """A real copy (not hard links), so tampering cannot reach the build cache."""
    return shutil.copytree(tiny_artifact, tmp_path / "artifact", copy_function=shutil.copyfile)


@pytest.mark.parametrize("name", ["step.rank0.safetensors", "tokenizer.json", "step.pt2"])
def test_tampered_files_are_refused(artifact_copy, name):
    """The weights are checked as they stream in, the other files before anything loads."""
    target = artifact_copy / name
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{name} does not match the sha256.*rebuild or re-download"):
        load_artifact(artifact_copy)


def format2_manifest(manifest: dict) -> dict:
    """What llama-compile wrote before format 3: one program, no program list, no quantization."""
    old = {k: v for k, v in manifest.items() if k not in ("programs", "quantization", "input_hash")}
    return {**old, "format_version": 2, "build": {**manifest["build"], "input_hash": manifest["input_hash"]},
            "passes": [{"name": p["name"], "matches": p["matches"]} for p in manifest["passes"]]}


def test_artifact_of_an_older_format_is_refused(artifact_copy):
    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    (artifact_copy / "manifest.json").write_text(json.dumps(format2_manifest(manifest)))
    with pytest.raises(ArtifactError, match=r"^\S+: artifact format 2, this runtime reads format 3; "
                                            "rebuild it with this version of llama-compile$"):
        load_artifact(artifact_copy)


def test_serving_a_format2_artifact_is_one_line_and_exit_status_2(artifact_copy, capsys):
    from llama_aot.bench.server_process import free_port

    from llama_aot.serve.cli import main

    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    (artifact_copy / "manifest.json").write_text(json.dumps(format2_manifest(manifest)))
    assert main([str(artifact_copy), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"llama-serve: error: {artifact_copy}: artifact format 2, this runtime reads format 3; "
                   "rebuild it with this version of llama-compile")


def test_format2_artifact_upgraded_for_the_benchmarks_loads_and_runs(artifact_copy):
    """bench/format2.py lets gpu.sh time a tree from before format 3 against this one."""
    from llama_aot.bench.format2 import upgrade

    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    renames = {"step.pt2": "model.pt2", "step.rank0.safetensors": "rank0.safetensors"}
    for new, old in renames.items():
        (artifact_copy / new).rename(artifact_copy / old)
    old_manifest = format2_manifest(manifest)
    old_manifest["files"] = {renames.get(n, n): entry for n, entry in manifest["files"].items()}
    (artifact_copy / "manifest.json").write_text(json.dumps(old_manifest))
    upgrade(artifact_copy)
    artifact = load_artifact(artifact_copy)
    assert artifact.manifest.program("step").package == "model.pt2"
    assert [p["phase"] for p in artifact.manifest.passes] == ["fuse"] * 3
    layout = KVCacheLayout.of(artifact.model_config, artifact.build_config)
    inputs = build_step_inputs([SequenceChunk((1, 2, 3), 0, (1,))], layout.block_size)
    assert torch.isfinite(call_step(artifact.step, inputs, layout.allocate(4, "cpu"))).all()


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["programs"][0].update(inputs=["tokens", "kv_cache"]), "program 'step' takes"),
    (lambda m: m["programs"][0].update(name="draft"), "must name 'step'"),
    (lambda m: m["programs"][0].update(weights=[]), "lists 0 weights files for world size 1"),
    (lambda m: m["programs"][0].update(package="other.pt2"), "names files"),
    (lambda m: m["build"].update(block_size=3), "invalid manifest"),
])
def test_inconsistent_manifest_is_refused(artifact_copy, edit, needle):
    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    edit(manifest)
    (artifact_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=needle):
        load_artifact(artifact_copy)


def _edit_manifest(directory, section, **changes):
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest[section].update(changes)
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("section, changes, needle", [
    ("target", {"device_type": "cuda", "arch": "sm_90"}, "rebuild with llama-compile --target cpu"),
    ("target", {"arch": "aarch64-neon"}, "rebuild it on this machine"),
    ("producer", {"torch": "2.9.0"}, "compiled with torch 2.9.0"),
])
def test_foreign_target_or_toolchain_is_refused(artifact_copy, section, changes, needle):
    _edit_manifest(artifact_copy, section, **changes)
    with pytest.raises(ArtifactError, match=needle):
        load_artifact(artifact_copy)


def test_missing_file_and_missing_manifest_are_refused(artifact_copy):
    (artifact_copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="missing files"):
        load_artifact(artifact_copy)
    (artifact_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="not an artifact"):
        load_artifact(artifact_copy)


def test_unchanged_rebuild_is_a_cache_hit(tiny_checkpoint, tiny_build, tiny_artifact, tmp_path):
    stream = io.StringIO()
    start = time.perf_counter()
    manifest = build_artifact(tiny_checkpoint, tiny_build, tmp_path / "again", Progress(stream))
    elapsed = time.perf_counter() - start
    assert "cache hit" in stream.getvalue() and "lower" not in stream.getvalue()
    assert elapsed < 10
    assert manifest == read_manifest(tiny_artifact)
    load_artifact(tmp_path / "again")


def test_a_long_build_stage_reports_its_elapsed_time_while_it_runs():
    """AOTInductor's lowering is minutes without output of its own: the stage says how long so far."""
    stream = io.StringIO()
    with Progress(stream, heartbeat_s=0.05).stage("lower (AOTInductor)"):
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[llama-compile] lower (AOTInductor) ..."
    assert len([line for line in lines if line.endswith("s so far")]) >= 2
    assert lines[-1].startswith("[llama-compile] lower (AOTInductor) done in ")


def test_cache_key_follows_the_inputs(tiny_checkpoint, tiny_build):
    ckpt = open_checkpoint(tiny_checkpoint)
    build = tiny_build.resolved(ckpt.config)
    key = input_hash(ckpt, build)
    assert input_hash(ckpt, build) == key
    assert input_hash(ckpt, dataclasses.replace(build, max_num_tokens=128)) != key
    assert input_hash(ckpt, dataclasses.replace(build, passes=("fuse_qkv",))) != key


def test_loaded_artifact_runs_a_step(tiny_artifact):
    artifact = load_artifact(tiny_artifact)
    cfg, build = artifact.model_config, artifact.build_config
    cache = KVCacheLayout.of(cfg, build).allocate(8, "cpu")
    inputs = build_step_inputs([SequenceChunk((1, 2, 3), 0, (1,))], build.block_size)
    logits = call_step(artifact.step, inputs, cache)
    assert logits.shape == (1, cfg.vocab_size) and torch.isfinite(logits).all()
    assert cache[:, :, 1, :3].abs().sum() > 0 and cache[:, :, 2:].abs().sum() == 0


def test_cuda_passes_compile_and_match_on_cpu(tiny_checkpoint, tiny_build, tiny_artifact, tmp_path):
    """The CUDA target's pass list, route_decode_linears' torch.cond included, through AOTInductor
    on the CPU: the build verifies, and steps on either side of the 16-row switch give the plain
    build's logits. (The CUDA kernels behind the cond are tested on the GPU machine.)"""
    from llama_aot.artifacts.config import TARGET_DEFAULTS

    build = dataclasses.replace(tiny_build, passes=TARGET_DEFAULTS["cuda"].passes)
    manifest = build_artifact(tiny_checkpoint, build, tmp_path / "routed", Progress(io.StringIO()))
    assert {"name": "route_decode_linears", "phase": "route", "matches": 4} in manifest.passes
    routed, plain = load_artifact(tmp_path / "routed"), load_artifact(tiny_artifact)
    layout = KVCacheLayout.of(plain.model_config, build)
    for rows in (1, 16, 17, 40):
        inputs = build_step_inputs([SequenceChunk(tuple(range(3, 3 + rows)), 0, tuple(range(1, 12)), True)],
                                   build.block_size)
        logits = [call_step(a.step, inputs, layout.allocate(12, "cpu")) for a in (routed, plain)]
        torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)


def test_step_time_does_not_grow_with_the_kv_cache(tiny_artifact):
    """The KV write must update the cache in place: a program that copies the cache around the
    write costs time proportional to the cache, which serving sizes to most of memory."""
    artifact = load_artifact(tiny_artifact)
    layout = KVCacheLayout.of(artifact.model_config, artifact.build_config)
    inputs = build_step_inputs([SequenceChunk((5,), 9, (1, 2, 3))], layout.block_size)

    def best_time(fn, cache):
        times = []
        for _ in range(10):
            start = time.perf_counter()
            fn(cache)
            times.append(time.perf_counter() - start)
        return min(times)

    def step(cache):
        call_step(artifact.step, inputs, cache)

    small_cache, large_cache = layout.allocate(16, "cpu"), layout.allocate(100_000, "cpu")  # 0.1 vs 200 MB
    small, large = best_time(step, small_cache), best_time(step, large_cache)
    copy = best_time(torch.clone, large_cache)  # what one copy of the cache costs on this machine, now
    assert large < small + copy / 4, (f"step {small * 1e3:.2f} ms with a small cache, {large * 1e3:.2f} ms with "
                                      f"a large one, whose copy takes {copy * 1e3:.2f} ms")
