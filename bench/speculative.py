"""`llama-bench speculative` (or `python -m llama_aot.bench.speculative`): what EAGLE speculation
buys at batch 1, on one artifact built with --speculative-algorithm, every setting in one process.

    llama-bench speculative --artifact ART [--steps 0,1,2,3,4,5] [--num-prompts 16] [--new-tokens 128]
        [--max-prompt-tokens N] [--dataset-path F] [--skip-conversations N] [--ignore-eos] [--out-dir DIR]
    llama-bench speculative --artifact ART --step-costs [--steps 0,1,2,3,4,5] [--context 128] [--repeats 50]

End to end: the engine in-process, one runner per number of draft steps K in --steps (0: the
artifact served without speculation, always measured, the baseline; the runtime's
speculative_num_steps override), each warmed up and, on a GPU, with its CUDA graphs captured as
llama-serve captures them. ShareGPT prompts in the artifact's chat format (its template, as
/v1/chat/completions renders them) are generated greedily one request at a time. Every prompt
runs under every K in turn, forward then reversed order from one prompt to the next, after one
untimed request each, so that the settings share the machine's minutes (docs/measuring.md) and
each prompt pairs them. Per K: ms per output token after the first (the first waits for the
prefill), output tokens per second over whole requests, the mean accept length (the Speculator's
counts), the speed-up against K = 0 with a signed-rank p-value over the prompts
(bench/paired.py), and whether the greedy tokens were K = 0's on every prompt. They must be: a
difference is printed as an error and the command exits with status 1 (after saving). The
engines run on threads of their own, which on the CPU costs more than llama-serve's main-thread
loop (serve/cli.py says why): CPU figures check the tool, GPU figures are the measurement.

Held-out prompts: llama-train-eagle trains on the first --num-prompts + --eval-prompts
conversations of its ShareGPT file, so pass that sum as --skip-conversations for the same file;
the prompts are a seeded draw from the conversations after them.

--step-costs: the wall time of one plain decode step (K = 0), one verify step (K + 1 tokens) and
the K draft calls after it (the first reads K + 1 tokens, the others one each; their mean is one
draft call), at batch 1 after --context tokens, through the runner as the engine calls it (graph
replays on a GPU, eager calls on the CPU) and each followed by reading back the argmax, as the
engine does. Medians over --repeats rounds that take turns. From them, a projection, not a
measurement: speedup(a) = a * t_decode / (t_verify + K * t_draft) at accept lengths a = 2, 3, 4
(those a K can reach, a <= K + 1). It needs no real head: bench/random_checkpoint.py
--eagle-head writes a random one for a random checkpoint with Llama-3.1-8B's shapes.

Both parts take K = 0 on the EAGLE artifact itself, whose step program also mixes the head's taps
(`eagle_fc`, 3H x H: 100 MB at 8B, ~30 us of an H100's ~6 ms step): a plain build's step is that
much faster (`llama-bench decode` times it).
"""
from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_aot.bench.datasets import MIN_SEQUENCE_TOKENS, BenchInputError

PROJECTION = "speedup(a) = a * t_decode / (t_verify + K * t_draft)"
ACCEPT_LENGTHS = (2, 3, 4)
WARMUP_ROUNDS = 3  # untimed step-cost rounds first: lazy initialisation and clocks


@dataclass(frozen=True)
class Generated:
    """One request's greedy tokens and when they arrived: submitted, first and last token."""
    tokens: tuple[int, ...]
    submitted: float
    first: float
    last: float


def load(path: Path):
    """The artifact, loaded for graph capture on a GPU, after its manifest says it has a draft."""
    from llama_aot.artifacts.errors import ArtifactError
    from llama_aot.artifacts.manifest import checked_manifest
    from llama_aot.runtime.artifact import load_artifact

    try:
        manifest, device = checked_manifest(path)
        if manifest.build.speculative_algorithm is None:
            raise BenchInputError(f"{path}: no draft program; build it with llama-compile --speculative-algorithm "
                                  "EAGLE3 --speculative-draft-model-path HEAD_DIR")
        return load_artifact(path, single_threaded=device == "cuda")
    except ArtifactError as e:
        raise BenchInputError(str(e)) from None


def runners(artifact, steps: list[int], context: int) -> dict:
    """A warmed-up ModelRunner per K, each for one sequence of up to `context` tokens."""
    from llama_aot.artifacts.errors import ConfigError
    from llama_aot.artifacts.kv_layout import KVCacheLayout
    from llama_aot.runtime.config import RuntimeConfig
    from llama_aot.runtime.model_runner import ModelRunner

    blocks = 1 + KVCacheLayout.of(artifact.model_config, artifact.build_config).blocks_for(context)
    out = {}
    for k in steps:
        try:
            runtime = RuntimeConfig(max_num_seqs=1, context_length=context, kv_cache_blocks=blocks,
                                    speculative_num_steps=k).resolve(artifact.model_config, artifact.build_config,
                                                                     artifact.weight_bytes)
            out[k] = ModelRunner(artifact, runtime)
        except ConfigError as e:
            raise BenchInputError(str(e)) from None
        out[k].warmup()
    return out


def chat_prompts(artifact_dir: Path, dataset_path: Path | None, count: int, skip: int, seed: int,
                 longest: int) -> list[list[int]]:
    """`count` ShareGPT first turns, after the first `skip` conversations, in a seeded order, as
    token ids in the artifact's chat format (plain text with its special tokens for a model
    without a template), of 4 to `longest` tokens."""
    from llama_aot.bench.datasets import load_conversations, load_tokenizer
    from llama_aot.serve.chat_template import load_chat_template

    template = load_chat_template(artifact_dir)
    if template is not None:
        def encode(text):
            return template.encode([{"role": "user", "content": text}])
    else:
        tokenizer = load_tokenizer(artifact_dir)

        def encode(text):
            return tokenizer.encode(text, add_special_tokens=True).ids
    pairs = load_conversations(dataset_path)[skip:]
    random.Random(seed).shuffle(pairs)
    prompts = []
    for text, _ in pairs:
        if len(prompts) == count:
            break
        ids = encode(text)
        if MIN_SEQUENCE_TOKENS <= len(ids) <= longest:
            prompts.append(ids)
    if len(prompts) < count:
        raise BenchInputError(f"only {len(prompts)} ShareGPT prompts after the first {skip} conversations fit in "
                              f"{longest} tokens; ask for fewer --num-prompts or --new-tokens, or skip fewer")
    return prompts


def generate(engine, request_id: str, prompt: list[int], params) -> Generated:
    """Serves one request through the running engine and waits for its last token."""
    tokens, times, done, errors = [], [], threading.Event(), []

    def sink(out):
        if out.token_id is not None:
            tokens.append(out.token_id)
            times.append(time.perf_counter())
        if out.error:
            errors.append(out.error)
        if out.finish_reason is not None:
            done.set()
    submitted = time.perf_counter()
    engine.submit(request_id, prompt, params, sink)
    done.wait()
    if errors or not tokens:
        raise RuntimeError(f"request {request_id} failed: {errors[0] if errors else 'no tokens'}")
    return Generated(tuple(tokens), submitted, times[0], times[-1])


def mismatches(reference: list[Generated], other: list[Generated]) -> list[int]:
    """The prompts (by index) whose greedy tokens differ from the reference run's."""
    return [i for i, (a, b) in enumerate(zip(reference, other)) if a.tokens != b.tokens]


def end_to_end(artifact, prompts: list[list[int]], steps: list[int], new_tokens: int, ignore_eos: bool) -> dict:
    """Per K: the Generated of every prompt, and the Speculator's verify steps and accepted
    drafts over them (0 for K = 0)."""
    from tokenizers import Tokenizer

    from llama_aot.runtime.engine import Engine
    from llama_aot.runtime.sampling import SamplingParams

    tokenizer = Tokenizer.from_file(str(artifact.path / "tokenizer.json"))
    context = max(map(len, prompts)) + new_tokens
    engines = {k: Engine(runner, tokenizer).start() for k, runner in runners(artifact, steps, context).items()}
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=ignore_eos)
    outcome = {k: {"requests": [], "verify_steps": 0, "accepted_drafts": 0} for k in steps}
    try:
        for k, engine in engines.items():
            generate(engine, "warm-up", prompts[0], params)
        for i, prompt in enumerate(prompts):
            for k in steps if i % 2 == 0 else steps[::-1]:
                stats = engines[k].speculator.stats if engines[k].speculator else None
                before = (stats.verify_steps, stats.accepted_drafts) if stats else (0, 0)
                outcome[k]["requests"].append(generate(engines[k], f"p{i}", prompt, params))
                if stats:
                    outcome[k]["verify_steps"] += stats.verify_steps - before[0]
                    outcome[k]["accepted_drafts"] += stats.accepted_drafts - before[1]
    finally:
        for engine in engines.values():
            engine.shutdown()
    return outcome


def _ms_per_token(requests: list[Generated]) -> float:
    """Decode time per output token after the first, over all requests."""
    tokens = sum(len(r.tokens) - 1 for r in requests)
    return sum(r.last - r.first for r in requests) / tokens * 1e3 if tokens else float("nan")


def summarize(outcome: dict) -> list[dict]:
    """One record per K (the module docstring's figures), K = 0's first."""
    from llama_aot.bench.paired import paired_difference

    base = outcome[0]["requests"]
    base_ms = _ms_per_token(base)
    per_prompt = {k: [_ms_per_token([r]) for r in o["requests"]] for k, o in outcome.items()}
    decoding = [i for i, r in enumerate(base) if len(r.tokens) > 1]  # the same for every K when tokens agree
    records = []
    for k, o in sorted(outcome.items()):
        requests, ms = o["requests"], _ms_per_token(o["requests"])
        record = {"steps": k, "prompts": len(requests), "output_tokens": sum(len(r.tokens) for r in requests),
                  "ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                  "request_tokens_per_s": sum(len(r.tokens) for r in requests)
                  / sum(r.last - r.submitted for r in requests),
                  "speedup": base_ms / ms, "prompt_ms_per_token": per_prompt[k],
                  "accept_length": 1 + o["accepted_drafts"] / o["verify_steps"] if o["verify_steps"] else None,
                  "verify_steps": o["verify_steps"], "accepted_drafts": o["accepted_drafts"],
                  "mismatched_prompts": mismatches(base, requests)}
        record["identical_to_no_speculation"] = not record["mismatched_prompts"]
        if k and len(decoding) >= 2 and record["identical_to_no_speculation"]:
            d = paired_difference([per_prompt[0][i] for i in decoding], [per_prompt[k][i] for i in decoding])
            record["against_no_speculation"] = {"median_ms_per_token_difference": d.median, "p_value": d.p_value,
                                                "verdict": d.verdict()}
        records.append(record)
    return records


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _step(runner, chunk):
    """A call of the runner's step on `chunk` that reads back the argmax of its logits rows."""
    from llama_aot.runtime.model_runner import StepPlan
    from llama_aot.runtime.sampling import greedy_tokens

    plan = StepPlan((chunk,), tuple(range(len(chunk.tokens))) if chunk.all_logits else (0,))
    return lambda: greedy_tokens(runner.execute(plan)).tolist()


def _drafts(runner, chunk, k: int):
    """The K draft calls after a verify step that computed `chunk`, from the hidden rows it left."""
    return lambda: runner.draft([chunk], runner.last_hidden, k)


def step_costs(artifact, steps: list[int], context: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call, every timed round's: "decode", and "verify K" and "drafts K" (the K draft
    calls after a verify step, reading its K + 1 tokens) for each K > 0 in `steps`. The calls take
    turns, forward then reversed from round to round; a draft call reads the hidden rows its
    runner's last verify step left (the first round runs in order)."""
    from llama_aot.artifacts.step_abi import SequenceChunk

    drafting = [k for k in steps if k]
    by_k = runners(artifact, [0, *drafting], context + 2 * max(drafting, default=0) + 2)
    table = tuple(range(1, by_k[0].runtime.num_blocks))
    calls = {"decode": _step(by_k[0], SequenceChunk((1,), context, table))}
    for k in drafting:
        runner, fed = by_k[k], tuple(range(1, k + 2))
        calls[f"verify {k}"] = _step(runner, SequenceChunk(fed, context, table, all_logits=True))
        calls[f"drafts {k}"] = _drafts(runner, SequenceChunk(fed, context, table), k)
    times = {name: [] for name in calls}
    with torch.inference_mode():
        for r in range(WARMUP_ROUNDS + repeats):
            for name in list(calls) if r % 2 == 0 else list(calls)[::-1]:
                seconds = _timed(calls[name])
                if r >= WARMUP_ROUNDS:
                    times[name].append(seconds)
    return times


def projected(times: dict[str, list[float]], steps: list[int]) -> list[dict]:
    """One record per K > 0: the median costs in ms and the projected speed-ups (PROJECTION)."""
    decode = statistics.median(times["decode"]) * 1e3
    records = []
    for k in (k for k in steps if k):
        verify, drafts = (statistics.median(times[f"{name} {k}"]) * 1e3 for name in ("verify", "drafts"))
        records.append({"steps": k, "decode_ms": decode, "verify_ms": verify, "draft_ms": drafts / k,
                        "drafts_ms": drafts,
                        "round_ms": {name: [t * 1e3 for t in times[name]] for name in ("decode", f"verify {k}",
                                                                                    f"drafts {k}")},
                        "projection": {"formula": PROJECTION, "speedup_at_accept_length": {
                            str(a): a * decode / (verify + drafts) for a in ACCEPT_LENGTHS if a <= k + 1}}})
    return records


def run(args) -> int:
    """`llama-bench speculative`: either part, printed and saved; 1 if speculation changed a
    greedy token."""
    from llama_aot.bench.results import save_results
    from llama_aot.compiler.package import git_sha

    artifact = load(args.artifact)
    build = artifact.build_config
    steps = sorted({0, *args.steps})
    device = torch.cuda.get_device_name() if artifact.device_type == "cuda" else "cpu"
    common = {"device": device, "git_sha": git_sha(), "artifact": str(artifact.path),
              "artifact_git_sha": artifact.manifest.producer["git_sha"], "dtype": build.dtype,
              "weight_quant": build.weight_quant, "build_speculative_num_steps": build.speculative_num_steps,
              "batch": 1}
    if args.step_costs:
        records = _report_step_costs(artifact, steps, args.context, args.repeats, device)
        print(save_results("speculative-step-costs", [{**common, **r} for r in records], args.out_dir))
        return 0
    records = _report_end_to_end(artifact, steps, args, device)
    print(save_results("speculative", [{**common, **r} for r in records], args.out_dir))
    differing = [r for r in records if not r["identical_to_no_speculation"]]
    for r in differing:
        print(f"llama-bench: error: with {r['steps']} draft steps the greedy tokens differ from those without "
              f"speculation on prompts {r['mismatched_prompts']}: speculation must not change them (a bug)",
              file=sys.stderr)
    return 1 if differing else 0


def _report_step_costs(artifact, steps: list[int], context: int, repeats: int, device: str) -> list[dict]:
    if steps == [0]:
        raise BenchInputError("--step-costs: give --steps with a number of draft steps above 0")
    longest = artifact.build_config.context_length - 2 * max(steps) - 2
    if context > longest:
        raise BenchInputError(f"--context {context}: a verify step and {max(steps)} drafts after it must fit the "
                              f"artifact's {artifact.build_config.context_length} tokens; give at most {longest}")
    print(f"{device}: {artifact.path}, batch 1 after {context} tokens, median of {repeats} rounds "
          f"({'CUDA-graph replays' if artifact.device_type == 'cuda' else 'eager calls'}), each with the argmax "
          "read back", flush=True)
    records = projected(step_costs(artifact, steps, context, repeats), steps)
    print(f"plain decode step: {records[0]['decode_ms']:.3f} ms")
    print(f"projection, not a measurement: {PROJECTION}, t_draft the mean of the K draft calls")
    for r in records:
        speedups = ", ".join(f"a={a}: {x:.2f}x" for a, x in r["projection"]["speedup_at_accept_length"].items())
        print(f"K={r['steps']}: verify step ({r['steps'] + 1} tokens) {r['verify_ms']:.3f} ms, draft call "
              f"{r['draft_ms']:.3f} ms ({r['drafts_ms']:.3f} ms for all {r['steps']}); projected speed-up {speedups}")
    return [{"context": context, "repeats": repeats, **r} for r in records]


def _report_end_to_end(artifact, steps: list[int], args, device: str) -> list[dict]:
    longest = artifact.build_config.context_length - args.new_tokens
    if args.max_prompt_tokens:
        longest = min(longest, args.max_prompt_tokens)
    prompts = chat_prompts(artifact.path, args.dataset_path, args.num_prompts, args.skip_conversations, args.seed,
                           longest)
    print(f"{device}: {artifact.path}, batch 1, {len(prompts)} ShareGPT prompts (chat format, "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens) x {args.new_tokens} new tokens"
          f"{'' if args.ignore_eos else ' at most'}, greedy; draft steps {', '.join(map(str, steps))}", flush=True)
    records = summarize(end_to_end(artifact, prompts, steps, args.new_tokens, args.ignore_eos))
    for r in records:
        line = (f"K={r['steps']}: {r['ms_per_token']:.3f} ms/token after the first, {r['tokens_per_s']:.1f} tokens/s "
                f"({r['request_tokens_per_s']:.1f} over whole requests)")
        if r["steps"]:
            accept = "-" if r["accept_length"] is None else f"{r['accept_length']:.2f}"
            line += f", accept length {accept}, {r['speedup']:.2f}x"
            if "against_no_speculation" in r:
                line += f" (p = {r['against_no_speculation']['p_value']:.3f})"
            line += ", greedy tokens " + ("identical" if r["identical_to_no_speculation"] else
                                          f"DIFFER on prompts {r['mismatched_prompts']}")
        print(line)
    fields = {"new_tokens": args.new_tokens, "max_prompt_tokens": longest, "ignore_eos": args.ignore_eos,
              "seed": args.seed,
              "skip_conversations": args.skip_conversations,
              "dataset_path": str(args.dataset_path) if args.dataset_path else None}
    return [{**fields, **r} for r in records]


def main(argv=None) -> int:
    from llama_aot.bench import cli

    return cli.main(["speculative", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
