"""`python -m llama_aot.bench.fp8_sensitivity CHECKPOINT`: which weights cost a model its accuracy
when they are rounded to FP8.

Scores HF transformers' LlamaForCausalLM (float32, on the CPU or the GPU) on the held-out ShareGPT
replies `llama-bench accuracy` uses (same seed, same texts), with the decoder's weights rounded to
e4m3 exactly as `llama-compile --fp8` rounds them (kernels/fp8_linear.py: one scale per output
channel; fusing q/k/v or gate/up first changes nothing, the scales being per row), in these
configurations: none, all, all but one kind of matmul, all but one layer. The weight-only form
computes exactly the model with rounded weights, so "all" predicts the --fp8 CPU artifact's
perplexity; the table says which layers to keep in the model dtype if the bound is missed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llama_aot.artifacts.target import describe_host
from llama_aot.bench.accuracy import hf_perplexity, sample_prompts_and_texts
from llama_aot.bench.datasets import load_tokenizer
from llama_aot.bench.results import save_results
from llama_aot.compiler.package import git_sha
from llama_aot.kernels.fp8_linear import dequantize_rows, quantize_rows

KINDS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}


def decoder_matmuls(model) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}


def score(model, originals: dict[str, torch.Tensor], rounded: dict[str, torch.Tensor], chosen: set[str],
          texts) -> float:
    """The mean perplexity over `texts` with the `chosen` matmuls' weights rounded, the others not."""
    for name, module in decoder_matmuls(model).items():
        module.weight.data = rounded[name] if name in chosen else originals[name]
    return sum(hf_perplexity(model, ids) for ids in texts) / len(texts)


def configurations(names: list[str], num_layers: int) -> dict[str, set[str]]:
    every = set(names)
    configs = {"none": set(), "all": every}
    for kind, leaves in KINDS.items():
        configs[f"all but {kind}"] = {n for n in every if n.rsplit(".", 1)[1] not in leaves}
    for i in range(num_layers):
        configs[f"all but layer {i}"] = {n for n in every if not n.startswith(f"model.layers.{i}.")}
    return configs


def main(argv=None) -> int:
    from transformers import LlamaForCausalLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="HF checkpoint directory")
    p.add_argument("--ppl-texts", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8, help="skipped first, as llama-bench accuracy uses them")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset-path", type=Path)
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM.from_pretrained(args.checkpoint, torch_dtype=torch.float32).to(device).eval()
    _, texts = sample_prompts_and_texts(load_tokenizer(args.checkpoint), args.dataset_path, args.seed,
                                        args.prompts, args.ppl_texts, args.max_len)
    matmuls = decoder_matmuls(model)
    originals = {n: m.weight.data for n, m in matmuls.items()}
    rounded = {n: dequantize_rows(*quantize_rows(w), w.dtype) for n, w in originals.items()}
    host = {"device": describe_host(device)["device_name"], "git_sha": git_sha(), "checkpoint": str(args.checkpoint),
            "ppl_texts": len(texts), "max_len": args.max_len}
    rows = []
    baseline = None
    for label, chosen in configurations(list(matmuls), model.config.num_hidden_layers).items():
        ppl = score(model, originals, rounded, chosen, texts)
        baseline = ppl if baseline is None else baseline
        rows.append({**host, "configuration": label, "quantized_matmuls": len(chosen), "perplexity": ppl,
                     "relative_change": ppl / baseline - 1})
        print(f"{label:>18}: perplexity {ppl:.4f} ({rows[-1]['relative_change']:+.2%})", flush=True)
    print(save_results("fp8-sensitivity", rows, args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
