"""Build-time verification: the compiled artifact must compute what the eager model computes.

Both run the same schedule on fixed prompts, with separate KV caches: a first step mixing whole
prompts with the first half of a longer one, a step mixing that prompt's second half with decode
tokens of the others, then decode steps fed with the eager model's greedy tokens. Every logit row is
compared. Prompts are seeded token ids, so verification needs no tokenizer and is reproducible.

A row counts as a greedy disagreement only if the compiled choice is worse than the eager
choice by more than the tolerance: a near-tie flipping by rounding is not an error, a wrong
token is.

An FP8 KV cache quantizes at run time, so a key that the compiled program computes one ulp away
from the eager one can round to the neighbouring e4m3 value, 16 times a bfloat16 ulp; the first
flips cascade through the later layers (SmolLM2, 37-token prefill: caches bit-identical through
layer 5, 15 of 7104 values differing at layer 10, 1940 at layer 25, logits 1e-2 apart). Such a
build is also measured against the unquantized model on the same steps, and the compiled program
must be no farther from its quantized reference than the quantization itself moves the logits:
a missing or wrong scale moves them far more.

Rounding to bfloat16 moves a deep model's logits much as that does: on SmolLM2 (30 layers, the
verifier's random-token prompts) the eager bfloat16 model is 0.66 from the float32 one on the
verifier's measure, and the compiled bfloat16 program 0.50 from the eager one, where the fixed
bfloat16 tolerance is 5e-2 (an 8B model on the GPU: 2.3e-2). So a reduced-precision build that
misses the fixed tolerance is measured once more against the float32 model on the same steps,
and passes if it is no farther from its eager reference than the dtype's own rounding (with a
quantized build's, its quantization's too) moves it.
"""
from __future__ import annotations

import dataclasses

import torch

from llama_aot.artifacts.config import BuildConfig, ModelConfig, torch_dtype
from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_draft, call_step

PROMPT_LENGTHS = (5, 37, 18)
DECODE_STEPS = 8
# (relative logit error, minimum greedy agreement) by dtype
TOLERANCES = {"float32": (1e-3, 1.0), "bfloat16": (5e-2, 0.95), "float16": (3e-2, 0.95)}


def _prompts(vocab_size: int, context_length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [min(n, context_length - DECODE_STEPS) for n in PROMPT_LENGTHS]
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@dataclasses.dataclass
class Schedule:
    """The verification steps as the eager reference ran them: each step's inputs (on the CPU), the
    cache blocks they address, and the reference's logits (and the unquantized model's)."""

    prompts: int
    steps: list[dict[str, torch.Tensor]]
    num_blocks: int
    eager_rows: list[torch.Tensor]
    plain_rows: list[torch.Tensor]
    plain_model: str = "the unquantized model"  # what computed plain_rows


def reference_run(eager, build: BuildConfig, cfg: ModelConfig, seed: int = 0, unquantized=None) -> Schedule:
    """Runs the schedule through `eager` (and `unquantized`), decode steps fed with its greedy tokens.

    `eager`: the model (or, for a quantized build, the passed program's module, unsharded) the
    compiled program must agree with, called through the step ABI. `unquantized`: for a build with
    an FP8 KV cache, the model itself, whose distance from `eager` bounds the tolerance."""
    bs = build.block_size
    prompts = _prompts(cfg.vocab_size, build.context_length, seed)[:build.max_num_seqs]
    layout = KVCacheLayout.of(cfg, build, whole=True)
    per_seq = layout.blocks_for(max(map(len, prompts)) + DECODE_STEPS)
    tables = [tuple(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(len(prompts))]
    num_blocks = 1 + len(prompts) * per_seq
    cache = layout.allocate(num_blocks, build.target)
    if unquantized is not None:
        plain_cache = dataclasses.replace(layout, dtype=build.dtype).allocate(num_blocks, build.target)

    schedule = Schedule(len(prompts), [], num_blocks, [], [])
    cached = [0] * len(prompts)
    decoded = [0] * len(prompts)
    last: dict[int, torch.Tensor] = {}
    while min(decoded) < DECODE_STEPS:
        step, budget = [], build.max_num_tokens
        for i, prompt in enumerate(prompts):
            if cached[i] < len(prompt):
                chunk = -(-len(prompt) // 2) if len(prompt) > 16 else len(prompt)
                toks = prompt[cached[i]:cached[i] + min(chunk, budget)]
            elif decoded[i] < DECODE_STEPS and budget > 0:
                toks = [int(last[i].argmax())]
                decoded[i] += 1
            else:
                continue
            if toks:
                step.append((i, cached[i], toks))
                cached[i] += len(toks)
                budget -= len(toks)
        chunks = [SequenceChunk(tuple(t), start, tables[i], all_logits=True) for i, start, t in step]
        inputs = build_step_inputs(chunks, bs, build.target)
        schedule.steps.append({k: v.cpu() for k, v in inputs.items()})
        with torch.no_grad():
            schedule.eager_rows.append(call_step(eager, inputs, cache).cpu())
            if unquantized is not None:
                schedule.plain_rows.append(call_step(unquantized, inputs, plain_cache).cpu())
        for (i, _, t), rows in zip(step, schedule.eager_rows[-1].split([len(t) for _, _, t in step])):
            last[i] = rows[-1]
    return schedule


def add_float32_rows(schedule: Schedule, model32, cfg: ModelConfig, build: BuildConfig) -> None:
    """Runs the float32 `model32` over the schedule's steps (in a float32 cache of its own) as its
    plain rows: how far rounding to the build's dtype alone moves the logits."""
    layout = dataclasses.replace(KVCacheLayout.of(cfg, build, whole=True), dtype="float32")
    cache = layout.allocate(schedule.num_blocks, build.target)
    with torch.no_grad():
        schedule.plain_rows = [call_step(model32, {k: v.to(build.target) for k, v in inputs.items()}, cache).cpu()
                               for inputs in schedule.steps]
    schedule.plain_model = "the float32 model"


def compiled_run(compiled, schedule: Schedule, layout: KVCacheLayout, device: str) -> list[torch.Tensor]:
    """The compiled program's logits over the schedule's steps, in a cache of its own (`layout`:
    this rank's). Under inference_mode, as serving calls it: under no_grad AOTInductor reaches the
    all-gather of a --tp program through a Python autograd kernel, and gloo's worker thread then
    needs the GIL (which the next step's call holds) to free it, a deadlock."""
    cache = layout.allocate(schedule.num_blocks, device)
    with torch.inference_mode():
        return [call_step(compiled, {k: v.to(device) for k, v in inputs.items()}, cache).cpu()
                for inputs in schedule.steps]


def compare(schedule: Schedule, compiled_rows: list[torch.Tensor], build: BuildConfig) -> dict:
    """The verification result of the compiled logits against the schedule's reference."""
    eager_all, compiled_all = torch.cat(schedule.eager_rows), torch.cat(compiled_rows)
    scale = eager_all.abs().max().item()
    rel_tol, min_agreement = TOLERANCES[build.dtype]
    relative, exact, agreement = _compare(eager_all, compiled_all, rel_tol * scale)
    result = {"prompts": schedule.prompts, "steps": len(schedule.steps),
              "rows": eager_all.shape[0], "max_abs_error": relative * scale, "logit_scale": scale,
              "relative_error": relative, "greedy_agreement": exact, "greedy_agreement_tie_aware": agreement}
    if schedule.plain_rows:
        q_relative, _, q_agreement = _compare(eager_all, torch.cat(schedule.plain_rows), rel_tol * scale)
        result["reference_gap"] = {"against": schedule.plain_model, "relative_error": q_relative,
                                   "greedy_agreement_tie_aware": q_agreement}
        rel_tol, min_agreement = max(rel_tol, q_relative), min(min_agreement, q_agreement)
    result["tolerance"] = {"relative_error": rel_tol, "greedy_agreement": min_agreement}
    result["passed"] = relative <= rel_tol and agreement >= min_agreement
    return result


def _compare(reference: torch.Tensor, other: torch.Tensor, tie: float) -> tuple[float, float, float]:
    """(relative max error, exact greedy agreement, greedy agreement where a choice within `tie` of
    the reference's best logit counts as agreeing) of `other`'s rows against `reference`'s."""
    scale = max(reference.abs().max().item(), 1e-12)
    picked = other.argmax(-1)
    exact = (picked == reference.argmax(-1)).float().mean().item()
    near = reference.gather(1, picked[:, None])[:, 0] >= reference.max(-1).values - tie
    return (reference - other).abs().max().item() / scale, exact, near.float().mean().item()


def verify_draft(compiled, eager, schedule: Schedule, layout: KVCacheLayout, build: BuildConfig,
                 hidden_size: int, seed: int = 0) -> dict:
    """The compiled draft program against the eager head over the schedule's steps, each with the
    same seeded hidden input (what the target's taps would give; the head's arithmetic does not
    depend on where it came from), in caches of their own (`layout`: the draft's). Compared as
    the target is, over the draft vocabulary's logits (the -inf elsewhere are equal by
    construction), and the hidden states the next draft step reads."""
    gen = torch.Generator().manual_seed(seed)
    caches = [layout.allocate(schedule.num_blocks, build.target) for _ in range(2)]
    rows = ([], [])
    with torch.inference_mode():
        for inputs in schedule.steps:
            hidden = torch.randn(inputs["tokens"].shape[0], hidden_size, generator=gen).to(torch_dtype(build.dtype))
            args = {k: v.to(build.target) for k, v in inputs.items()}
            for program, cache, out in zip((eager, compiled), caches, rows):
                logits, h = call_draft(program, args, hidden.to(build.target), cache)
                out.append((logits.cpu(), h.float().cpu()))
    drafted = torch.isfinite(torch.cat([r[0] for r in rows[0]]))
    eager_logits = torch.cat([r[0] for r in rows[0]])[drafted]
    compiled_logits = torch.cat([r[0] for r in rows[1]])[drafted]
    draft = dataclasses.replace(schedule, eager_rows=[eager_logits.view(len(drafted), -1)], plain_rows=[])
    result = compare(draft, [compiled_logits.view(len(drafted), -1)], build)
    eager_h, compiled_h = torch.cat([r[1] for r in rows[0]]), torch.cat([r[1] for r in rows[1]])
    result["hidden_relative_error"] = ((eager_h - compiled_h).abs().max() / eager_h.abs().max()).item()
    result["passed"] = result["passed"] and result["hidden_relative_error"] <= result["tolerance"]["relative_error"]
    return result
