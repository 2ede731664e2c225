"""Random-weight checkpoints with the real Llama 3.1 shapes, for speed measurements.

Speed depends on the shapes, not the values, and the GPU machine cannot download weights, so the
benchmark builds its own: Meta's published Llama-3.1-8B config, random bf16 weights scaled like an
initialised model, sharded safetensors with an index, and a small byte-level tokenizer (the
tokenizer only has to exist; the decode benchmark feeds token ids). Serving benchmarks count
tokens of real text, so they pass `--tokenizer` with a real Llama 3 tokenizer.json instead.

`--eagle-head DIR` also writes a random EAGLE-3 head for the checkpoint, for the cost of drafting
and verifying at these shapes (bench/speculative.py --step-costs): speed does not depend on
whether the drafts are right.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
}
SHARD_BYTES = 4 << 30


def parameter_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    return shapes


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={chr(c): c - 32 for c in range(32, 127)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def write_random_checkpoint(out: Path, num_layers: int | None = None, seed: int = 0, device: str = "cpu",
                            tokenizer: Path | None = None) -> Path:
    cfg = dict(LLAMA_31_8B)
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, shape in parameter_shapes(cfg).items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            std = shape[1] ** -0.5
            t = (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()
        current[name] = t
        size += t.numel() * 2
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * 2 for s in shards for t in s.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000,
                                                            "eos_token_id": [128001, 128008, 128009]}))
    write_tokenizer(out, tokenizer)
    return out


def write_tokenizer(out: Path, tokenizer: Path | None) -> None:
    """`tokenizer` (a tokenizer.json) into the checkpoint `out`, with the tokenizer_config.json
    beside it if there is one, for its chat template; without one, the byte-level stand-in."""
    (out / "tokenizer.json").write_text(tokenizer.read_text() if tokenizer else _tokenizer_json())
    if tokenizer and (config := tokenizer.with_name("tokenizer_config.json")).is_file():
        (out / "tokenizer_config.json").write_text(config.read_text())


def write_random_head(checkpoint: Path, out: Path, seed: int = 0) -> Path:
    """A random EAGLE-3 head for `checkpoint` in the layout llama-compile reads, in bfloat16: its
    draft vocabulary the first 32,000 ids (llama-train-eagle's default size; all of a smaller
    vocabulary). The head's embedding table is the target's, never written, so a meta tensor
    stands in for it."""
    from llama_aot.compiler.checkpoint import open_checkpoint
    from llama_aot.compiler.eagle_train import new_head, save
    from llama_aot.compiler.train_eagle_cli import DEFAULT_DRAFT_VOCAB

    config = open_checkpoint(checkpoint).config
    draft_ids = torch.arange(min(DEFAULT_DRAFT_VOCAB, config.vocab_size))
    embed = torch.empty(config.vocab_size, config.hidden_size, device="meta")
    head = new_head(config, draft_ids, embed, seed=seed).to(torch.bfloat16)
    save(head, out, json.loads((checkpoint / "config.json").read_text()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, help="fewer layers than 32, for quick iterations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", type=Path, help="a tokenizer.json to ship instead of the byte-level stand-in "
                   "(with the tokenizer_config.json beside it, if there is one: the chat template)")
    p.add_argument("--eagle-head", type=Path, metavar="HEAD_DIR",
                   help="also write a random EAGLE-3 head for the checkpoint here; a checkpoint already in OUT "
                        "is kept (only the head is written)")
    args = p.parse_args(argv)
    if args.eagle_head is None or not (args.out / "config.json").is_file():
        write_random_checkpoint(args.out, args.layers, device=args.device, tokenizer=args.tokenizer)
        print(args.out)
    if args.eagle_head is not None:
        print(write_random_head(args.out, args.eagle_head))


if __name__ == "__main__":
    main()
