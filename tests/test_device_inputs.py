"""What a GPU run carries in: Meta's Llama 3 tokenizer with its real ids and Llama 3.1's chat
template, and a ShareGPT subset that the benchmarks read like the full file."""
import json

from tokenizers import Tokenizer

from llama_aot.bench.datasets import load_conversations
from llama_aot.bench.device_inputs import write_device_inputs
from llama_aot.bench.llama3_tokenizer import BOS_ID, VOCAB_SIZE
from llama_aot.bench.random_checkpoint import LLAMA_31_8B, write_tokenizer
from llama_aot.serve.chat_template import load_chat_template


def test_device_inputs_hold_the_llama3_tokenizer_and_sharegpt_pairs(tmp_path):
    out = write_device_inputs(tmp_path / "inputs", conversations=7)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == VOCAB_SIZE == LLAMA_31_8B["vocab_size"]
    assert tok.encode("Hello world", add_special_tokens=True).ids == [BOS_ID, 9906, 1917]
    pairs = load_conversations(out / "sharegpt.json")
    assert pairs == load_conversations()[:7]
    assert len(json.loads((out / "sharegpt.json").read_text())) == 7


def test_random_checkpoints_built_from_them_serve_chat(tmp_path):
    """The GPU benchmarks' random-weight checkpoints take the tokenizer from the device inputs; the
    chat template must come along, or every chat request to their artifacts is a 400."""
    inputs = write_device_inputs(tmp_path / "inputs", conversations=1)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    write_tokenizer(checkpoint, inputs / "tokenizer.json")
    template = load_chat_template(checkpoint)
    assert template is not None
    prompt = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert prompt.endswith("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
