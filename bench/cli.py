"""`llama-bench`: speed and accuracy measurements, each written to bench/results/ as JSON.

    llama-bench decode --artifact DIR [--checkpoint HF_DIR] --batch 1,8,32 --context 128,2048,8192
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def parse_args(argv):
    p = _Parser(prog="llama-bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode", help="decode ms/token, tok/s and bandwidth, against HF static+compile")
    d.add_argument("--artifact", type=Path, required=True)
    d.add_argument("--checkpoint", type=Path, help="HF checkpoint of the same weights, for the HF baseline")
    d.add_argument("--batch", type=_ints, default=[1])
    d.add_argument("--context", type=_ints, default=[128])
    d.add_argument("--new-tokens", type=int, default=256)
    d.add_argument("--model-name", default="llama-3.1-8b")
    d.add_argument("--no-cuda-graph", action="store_true")
    d.add_argument("--baseline-all", action="store_true",
                   help="time the HF baseline at every batch and context, not only the first of each")
    d.add_argument("--out-dir", type=Path)
    return p.parse_args(argv)


def run_decode(args) -> int:
    import torch

    from llama_aot.bench.decode import copy_bandwidth, hf_decode_ms, measure_decode
    from llama_aot.bench.results import save_results
    from llama_aot.compiler.package import git_sha
    from llama_aot.runtime.artifact import load_artifact

    if not torch.cuda.is_available():
        print("llama-bench: error: decode benchmarks need a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"{device}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    baselines = {}
    if args.checkpoint is not None:
        shapes = [(b, c) for b in args.batch for c in args.context] if args.baseline_all \
            else [(args.batch[0], args.context[0])]
        for b, c in shapes:
            baselines[(b, c)] = hf_decode_ms(args.checkpoint, b, c, args.new_tokens)
            print(f"HF static+compile batch {b} context {c}: {baselines[(b, c)]:.2f} ms/token")
    artifact = load_artifact(args.artifact, device="cuda", single_threaded=not args.no_cuda_graph)
    records = []
    for b in args.batch:
        for c in args.context:
            r = measure_decode(artifact, b, c, args.new_tokens, cuda_graph=not args.no_cuda_graph, bandwidth=bandwidth)
            base = baselines.get((b, c))
            records.append({"device": device, "git_sha": git_sha(), "model": args.model_name,
                            "dtype": artifact.build_config.dtype, "batch": b, "context": c,
                            "ms_per_token": r.ms_per_token, "tok_per_s": r.tok_per_s,
                            "bandwidth_fraction": r.bandwidth_fraction,
                            "baseline": {"name": "hf-transformers-static-cache-torch-compile", "ms_per_token": base}
                            if base is not None else None})
            speedup = f", {base / r.ms_per_token:.2f}x HF" if base else ""
            print(f"batch {b:3d} context {c:5d}: {r.ms_per_token:6.2f} ms/token, {r.tok_per_s:8.1f} tok/s, "
                  f"{r.bandwidth_fraction:.0%} of copy bandwidth{speedup}")
    print(save_results("decode", records, args.out_dir))
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return {"decode": run_decode}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
