"""`llama-bench accuracy`: does the compiled artifact compute what a reference computes on the same
weights, on real text rather than the build verifier's random token ids? The reference is HF
transformers' LlamaForCausalLM (`--checkpoint`: is the compiler exact?) or another artifact of the
same checkpoint (`--baseline`, typically the unquantized build: what does `--fp8` cost?).

Greedy-token agreement is teacher-forced: the reference generates each prompt's greedy continuation,
the artifact scores prompt + continuation in one pass, and we count the positions where its argmax
is the reference's token; forcing keeps one early near-tie from failing every later token. A prompt
whose every forced position agrees is one whose free-running greedy continuation is identical to the
reference's (same prefix, same argmax, by induction), so the same pass also counts identical
continuations. The logits' relative error, ||artifact - reference|| / ||reference|| over those
positions, is reported as the worst prompt's. Perplexity is measured on held-out ShareGPT replies
(conversations not used as prompts) by both. HF runs on the artifact's device: an 8B model in fp32
is too slow on CPU.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_step
from llama_aot.bench.datasets import BenchInputError, load_conversations, load_tokenizer

PROMPT_TOKENS = 64


def _sequence_cache(artifact, num_tokens: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A KV cache and block table for one sequence of up to `num_tokens` tokens."""
    layout = KVCacheLayout.of(artifact.model_config, artifact.build_config)
    blocks = layout.blocks_for(num_tokens)
    return layout.allocate(1 + blocks, artifact.device_type), tuple(range(1, 1 + blocks))  # block 0 stays free


def _run(artifact, cache, table, tokens: list[int], start: int, all_logits: bool) -> torch.Tensor:
    """Feeds `tokens`, at positions `start...`, in chunks of the build's token budget; returns a
    logit row per token, or per chunk (its last token's) unless `all_logits`."""
    build, rows = artifact.build_config, []
    for offset in range(0, len(tokens), build.max_num_tokens):
        chunk = SequenceChunk(tuple(tokens[offset:offset + build.max_num_tokens]), start + offset, table, all_logits)
        inputs = build_step_inputs([chunk], build.block_size, artifact.device_type)
        with torch.no_grad():
            rows.append(call_step(artifact.step, inputs, cache).float().cpu())
    return torch.cat(rows)


def artifact_logits(artifact, tokens: list[int]) -> torch.Tensor:
    """Logits for every position of one sequence, prefilled in chunks of the build's token budget."""
    cache, table = _sequence_cache(artifact, len(tokens))
    return _run(artifact, cache, table, tokens, 0, all_logits=True)


def artifact_greedy(artifact, tokens: list[int], new_tokens: int) -> list[int]:
    """Argmax decoding as the serving loop runs it: prefill, then one token per step on the cache."""
    cache, table = _sequence_cache(artifact, len(tokens) + new_tokens)
    out = [int(_run(artifact, cache, table, tokens, 0, all_logits=False)[-1].argmax())]
    while len(out) < new_tokens:
        out.append(int(_run(artifact, cache, table, out[-1:], len(tokens) + len(out) - 1, False)[-1].argmax()))
    return out


def hf_greedy(model, tokens: list[int], new_tokens: int) -> list[int]:
    """Plain argmax decoding. Not `generate`: its generation_config processors (EOS suppression
    for min_new_tokens, repetition penalties) would pick tokens the logits do not."""
    device = model.device
    out, ids, past = [], torch.tensor([tokens], device=device), None
    with torch.no_grad():
        for _ in range(new_tokens):
            step = model(ids, past_key_values=past, use_cache=True)
            past = step.past_key_values
            out.append(int(step.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]], device=device)
    return out


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    """An HF causal LM's float32 logits for every position of `tokens`, in one pass on its device."""
    with torch.no_grad():
        return model(torch.tensor([tokens], device=model.device)).logits[0].float().cpu()


class BaselineArtifact:
    """The `--baseline` reference: another artifact of the same checkpoint, run as the runtime runs it."""

    name = "baseline"

    def __init__(self, artifact):
        self.artifact = artifact
        self.context_length = artifact.build_config.context_length
        self.fields = {"reference": "artifact", "baseline": str(artifact.path),
                       "baseline_weight_quant": artifact.build_config.weight_quant,
                       "baseline_kv_dtype": artifact.build_config.kv_dtype}

    def greedy(self, tokens: list[int], new_tokens: int) -> list[int]:
        return artifact_greedy(self.artifact, tokens, new_tokens)

    def logits(self, tokens: list[int]) -> torch.Tensor:
        return artifact_logits(self.artifact, tokens)


class HFReference:
    """The `--checkpoint` reference: HF transformers' LlamaForCausalLM in float32 on `device`."""

    name = "HF"

    def __init__(self, checkpoint, device: str):
        from transformers import LlamaForCausalLM

        if not (checkpoint / "config.json").is_file():
            raise BenchInputError(f"{checkpoint}: not an HF checkpoint (no config.json)")
        self.model = LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).to(device).eval()
        self.context_length = self.model.config.max_position_embeddings
        self.fields = {"reference": "hf", "checkpoint": str(checkpoint)}

    def greedy(self, tokens: list[int], new_tokens: int) -> list[int]:
        return hf_greedy(self.model, tokens, new_tokens)

    def logits(self, tokens: list[int]) -> torch.Tensor:
        return hf_logits(self.model, tokens)


@dataclass(frozen=True)
class TeacherForced:
    """The module docstring's teacher-forced comparison over a set of prompts."""

    agreement: float  # of all forced positions
    identical: int  # prompts whose every forced position agrees
    worst_logits_error: float  # ||artifact - reference|| / ||reference||, the worst prompt's


def teacher_forced(artifact, reference, prompts: list[list[int]], new_tokens: int) -> TeacherForced:
    """`artifact` against `reference` (HFReference or BaselineArtifact) on `prompts`, each forced
    with the reference's greedy continuation of `new_tokens`."""
    agree = total = identical = 0
    worst_error = 0.0
    for ids in prompts:
        forced = reference.greedy(ids, new_tokens)
        ours = artifact_logits(artifact, ids + forced)[len(ids) - 1:-1]
        theirs = reference.logits(ids + forced)[len(ids) - 1:-1]
        worst_error = max(worst_error, ((ours - theirs).norm() / theirs.norm()).item())
        matches = sum(a == b for a, b in zip(ours.argmax(-1).tolist(), forced))
        agree += matches
        identical += matches == len(forced)
        total += len(forced)
    return TeacherForced(agree / total, identical, worst_error)


def sample_prompts_and_texts(tokenizer, dataset_path, seed: int, num_prompts: int, num_texts: int,
                             max_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """Shuffled ShareGPT conversations: the first `num_prompts` give prompts (their first
    PROMPT_TOKENS tokens), the next `num_texts` give held-out replies for perplexity. The same seed
    gives the same sets, so two artifacts (or two quantizations) are scored on the same text."""
    pairs = load_conversations(dataset_path)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    prompts, texts = [], []
    for index in order:
        prompt, reply = pairs[index]
        if len(prompts) < num_prompts:
            ids = tokenizer.encode(prompt, add_special_tokens=True).ids[:PROMPT_TOKENS]
            if len(ids) >= 4:
                prompts.append(ids)
        elif len(texts) < num_texts:
            ids = tokenizer.encode(reply, add_special_tokens=True).ids[:max_len]
            if len(ids) >= 16:
                texts.append(ids)
        else:
            break
    if len(prompts) < num_prompts or len(texts) < num_texts:
        raise BenchInputError("not enough ShareGPT conversations for the requested prompts and perplexity texts")
    return prompts, texts


def perplexity(logits: torch.Tensor, tokens: list[int]) -> float:
    """exp of the mean next-token negative log-likelihood."""
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(tokens[1:]))
    return math.exp(nll.item())


def hf_perplexity(model, tokens: list[int]) -> float:
    """The perplexity an HF causal LM gives `tokens`, scored in one pass on the model's device."""
    return perplexity(hf_logits(model, tokens), tokens)


def check_same_model(artifact_path, baseline_path) -> None:
    """Refuses a baseline of another model or tokenizer, before its weights load: the prompts would
    not be the same tokens, nor its logits comparable position by position."""
    from llama_aot.artifacts.manifest import read_manifest

    ours, theirs = read_manifest(artifact_path).model.to_dict(), read_manifest(baseline_path).model.to_dict()
    differ = [f"{k} {theirs[k]} vs {ours[k]}" for k in ours if ours[k] != theirs[k]]
    if differ:
        raise BenchInputError(f"--baseline {baseline_path} is another model ({'; '.join(differ)}); "
                              "pass a build of the same checkpoint")
    if load_tokenizer(artifact_path).to_str() != load_tokenizer(baseline_path).to_str():
        raise BenchInputError(f"--baseline {baseline_path} has another tokenizer than {artifact_path}; "
                              "pass a build of the same checkpoint")


def evaluate(args) -> dict:
    from llama_aot.artifacts.errors import ArtifactError
    from llama_aot.bench.results import save_results
    from llama_aot.compiler.package import git_sha
    from llama_aot.runtime.artifact import load_artifact

    try:
        artifact = load_artifact(args.artifact)
        if args.baseline is None:
            reference = HFReference(args.checkpoint, artifact.device_type)
        else:
            check_same_model(args.artifact, args.baseline)
            reference = BaselineArtifact(load_artifact(args.baseline))
    except ArtifactError as e:
        raise BenchInputError(str(e)) from None
    tokenizer = load_tokenizer(args.artifact)
    context = min(artifact.build_config.context_length, reference.context_length)
    new_tokens = min(args.new_tokens, context - PROMPT_TOKENS - 1)
    max_len = min(args.max_len, context)

    prompts, texts = sample_prompts_and_texts(tokenizer, args.dataset_path, args.seed, args.prompts,
                                              args.ppl_texts, max_len)

    scored = teacher_forced(artifact, reference, prompts, new_tokens)
    mean_a = sum(perplexity(artifact_logits(artifact, ids), ids) for ids in texts) / len(texts)
    mean_r = sum(perplexity(reference.logits(ids), ids) for ids in texts) / len(texts)
    build, name = artifact.build_config, reference.name
    record = {"device": artifact.manifest.target.get("device_name") or artifact.device_type,
              "git_sha": git_sha(), "artifact": str(args.artifact), "dtype": build.dtype,
              "weight_quant": build.weight_quant, "kv_dtype": build.kv_dtype, **reference.fields,
              "prompts": len(prompts), "new_tokens": new_tokens,
              "greedy_agreement": scored.agreement, "identical_continuations": scored.identical,
              "logits_relative_error": scored.worst_logits_error, "ppl_texts": len(texts), "max_len": max_len,
              "perplexity_artifact": mean_a, f"perplexity_{name.lower()}": mean_r,
              "perplexity_relative_change": (mean_a - mean_r) / mean_r}
    print(f"greedy-token agreement with {name} (teacher-forced, {len(prompts)} prompts x {new_tokens} tokens): "
          f"{record['greedy_agreement']:.4f}; identical greedy continuations: {scored.identical}/{len(prompts)}")
    print(f"logits relative error against {name} (worst prompt): {scored.worst_logits_error:.2e}")
    print(f"perplexity on {len(texts)} held-out ShareGPT replies: artifact {mean_a:.4f}, {name} {mean_r:.4f} "
          f"(relative change {record['perplexity_relative_change']:+.2e})")
    print(save_results("accuracy", [record], args.out_dir))
    return record
