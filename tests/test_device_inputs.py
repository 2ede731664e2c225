"""What a GPU run carries in: Meta's Llama 3 tokenizer with its real ids, and a ShareGPT subset that
the benchmarks read like the full file."""
import json

from tokenizers import Tokenizer

from llama_aot.bench.datasets import load_conversations
from llama_aot.bench.device_inputs import write_device_inputs
from llama_aot.bench.llama3_tokenizer import BOS_ID, VOCAB_SIZE
from llama_aot.bench.random_checkpoint import LLAMA_31_8B


def test_device_inputs_hold_the_llama3_tokenizer_and_sharegpt_pairs(tmp_path):
    out = write_device_inputs(tmp_path / "inputs", conversations=7)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == VOCAB_SIZE == LLAMA_31_8B["vocab_size"]
    assert tok.encode("Hello world", add_special_tokens=True).ids == [BOS_ID, 9906, 1917]
    pairs = load_conversations(out / "sharegpt.json")
    assert pairs == load_conversations()[:7]
    assert len(json.loads((out / "sharegpt.json").read_text())) == 7
