"""The embedded default (SmolLM2-135M-Instruct) built as `llama-compile --fp8 --fp8-ignore
gate_up_proj --kv-cache-dtype fp8_e4m3`: its perplexity stays within the FP8 issue's bound (+3 %)
of the unquantized default's on the same held-out ShareGPT replies, and it serves the stock
`openai` client, saying at start-up that its cache is e4m3.

Why gate/up stay in float32: with every matmul in FP8 this 135M model loses +2.9 % on 16 texts and
+3.2 % on these 8 (docs/fp8.md), at the bound; its MLP gate/up projections carry most of that, and
keeping them is the best configuration the sensitivity table found."""
import openai
import pytest

from llama_aot.artifacts.config import FP8_KV, BuildConfig
from llama_aot.bench.accuracy import artifact_logits, perplexity, sample_prompts_and_texts
from llama_aot.bench.datasets import load_tokenizer
from llama_aot.compiler.build import build_artifact
from llama_aot.runtime.artifact import load_artifact

from conftest import background_artifact
from server import ServerProcess

PPL_TEXTS, MAX_LEN = 8, 256
BOUND = 0.03  # the bound for FP8 weights with an FP8 KV cache


@pytest.fixture(scope="module")
def fp8_default(smollm2_checkpoint, tmp_path_factory):
    if (built := background_artifact("fp8_default")) is not None:
        return built
    out = tmp_path_factory.mktemp("artifacts") / "smollm2-fp8-kv-fp8"
    build_artifact(smollm2_checkpoint, BuildConfig(weight_quant="fp8", fp8_ignore=("gate_up_proj",), kv_dtype=FP8_KV),
                   out)
    return out


def test_perplexity_is_within_the_bound_of_the_unquantized_default(fp8_default, smollm2_artifact):
    _, texts = sample_prompts_and_texts(load_tokenizer(smollm2_artifact), None, seed=0, num_prompts=0,
                                        num_texts=PPL_TEXTS, max_len=MAX_LEN)

    def mean_perplexity(path):
        artifact = load_artifact(path)
        return sum(perplexity(artifact_logits(artifact, ids), ids) for ids in texts) / len(texts)

    quantized, plain = mean_perplexity(fp8_default), mean_perplexity(smollm2_artifact)
    assert 0 < quantized / plain - 1 < BOUND, (quantized, plain)


def test_the_fp8_default_serves_the_openai_client(fp8_default):
    server = ServerProcess(fp8_default)
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model=fp8_default.name, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        assert reply.usage.completion_tokens <= 24
    finally:
        server.stop()
    assert f"in {FP8_KV}" in server.output()
