"""`llama-bench accuracy`: does the compiled artifact compute what HF transformers computes on the
same weights, on real text rather than the build verifier's random token ids?

Greedy-token agreement is teacher-forced: HF generates each prompt's greedy continuation, the
artifact scores prompt + continuation in one pass, and we count the positions where its argmax is
HF's token; forcing keeps one early near-tie from failing every later token. A prompt whose every
forced position agrees is one whose free-running greedy continuation is identical to HF's (same
prefix, same argmax, by induction), so the same pass also counts identical continuations. The
logits' relative error, ||artifact - HF|| / ||HF|| over those positions, is reported as the worst
prompt's. Perplexity is measured on held-out ShareGPT replies (conversations not used as prompts)
by both. HF runs on the artifact's device: an 8B model in fp32 is too slow on CPU.
"""
from __future__ import annotations

import math
import random

import torch

from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_step
from llama_aot.bench.datasets import BenchInputError, load_conversations, load_tokenizer

PROMPT_TOKENS = 64


def artifact_logits(artifact, tokens: list[int]) -> torch.Tensor:
    """Logits for every position of one sequence, prefilled in chunks of the build's token budget."""
    build, layout = artifact.build_config, KVCacheLayout.of(artifact.model_config, artifact.build_config)
    blocks = layout.blocks_for(len(tokens))
    table = tuple(range(1, 1 + blocks))  # block 0 stays free, as the runtime keeps it
    device = artifact.device_type
    cache = layout.allocate(1 + blocks, device)
    rows = []
    for start in range(0, len(tokens), build.max_num_tokens):
        chunk = SequenceChunk(tuple(tokens[start:start + build.max_num_tokens]), start, table, all_logits=True)
        inputs = build_step_inputs([chunk], build.block_size, device)
        with torch.no_grad():
            rows.append(call_step(artifact.step, inputs, cache).float().cpu())
    return torch.cat(rows)


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
    with torch.no_grad():
        return perplexity(model(torch.tensor([tokens], device=model.device)).logits[0].cpu(), tokens)


def evaluate(args) -> dict:
    from transformers import LlamaForCausalLM

    from llama_aot.artifacts.errors import ArtifactError
    from llama_aot.bench.results import save_results
    from llama_aot.compiler.package import git_sha
    from llama_aot.runtime.artifact import load_artifact

    try:
        artifact = load_artifact(args.artifact)
    except ArtifactError as e:
        raise BenchInputError(str(e)) from None
    if not (args.checkpoint / "config.json").is_file():
        raise BenchInputError(f"{args.checkpoint}: not an HF checkpoint (no config.json)")
    device = artifact.device_type
    hf = LlamaForCausalLM.from_pretrained(args.checkpoint, torch_dtype=torch.float32).to(device).eval()
    tokenizer = load_tokenizer(args.artifact)
    context = artifact.build_config.context_length
    new_tokens = min(args.new_tokens, context - PROMPT_TOKENS - 1)
    max_len = min(args.max_len, context)

    prompts, texts = sample_prompts_and_texts(tokenizer, args.dataset_path, args.seed, args.prompts,
                                              args.ppl_texts, max_len)

    agree = total = identical = 0
    worst_error = 0.0
    for ids in prompts:
        forced = hf_greedy(hf, ids, new_tokens)
        ours = artifact_logits(artifact, ids + forced)[len(ids) - 1:-1]
        with torch.no_grad():
            theirs = hf(torch.tensor([ids + forced], device=device)).logits[0, len(ids) - 1:-1].float().cpu()
        worst_error = max(worst_error, ((ours - theirs).norm() / theirs.norm()).item())
        matches = sum(a == b for a, b in zip(ours.argmax(-1).tolist(), forced))
        agree += matches
        identical += matches == len(forced)
        total += len(forced)
    ppl_artifact, ppl_hf = [], []
    for ids in texts:
        ppl_artifact.append(perplexity(artifact_logits(artifact, ids), ids))
        ppl_hf.append(hf_perplexity(hf, ids))
    mean_a, mean_h = sum(ppl_artifact) / len(texts), sum(ppl_hf) / len(texts)
    record = {"device": artifact.manifest.target.get("device_name") or artifact.device_type,
              "git_sha": git_sha(), "artifact": str(args.artifact), "checkpoint": str(args.checkpoint),
              "dtype": artifact.build_config.dtype, "prompts": len(prompts), "new_tokens": new_tokens,
              "greedy_agreement": agree / total, "identical_continuations": identical,
              "logits_relative_error": worst_error, "ppl_texts": len(texts), "max_len": max_len,
              "perplexity_artifact": mean_a, "perplexity_hf": mean_h,
              "perplexity_relative_difference": abs(mean_a - mean_h) / mean_h}
    print(f"greedy-token agreement (teacher-forced, {len(prompts)} prompts x {new_tokens} tokens): "
          f"{record['greedy_agreement']:.4f}; identical greedy continuations: {identical}/{len(prompts)}")
    print(f"logits relative error (worst prompt): {worst_error:.2e}")
    print(f"perplexity on {len(texts)} held-out ShareGPT replies: artifact {mean_a:.4f}, HF {mean_h:.4f} "
          f"(relative difference {record['perplexity_relative_difference']:.2e})")
    print(save_results("accuracy", [record], args.out_dir))
    return record
