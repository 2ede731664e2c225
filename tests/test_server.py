"""llama-serve end to end on the embedded default (SmolLM2, CPU artifact), through the stock
`openai` client and raw HTTP, against a real `llama-serve` process."""
import re
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from server import ServerProcess

MODEL = "smollm2"
FACTS = ["France", "Japan", "Italy", "Spain", "Egypt", "Canada", "Kenya", "Peru"]


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, question, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          **{"temperature": 0, **kw})


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}


def test_chat_answer_streamed_and_not(client):
    whole = ask(client, "What is the capital of France?", max_tokens=32)
    assert "Paris" in whole.choices[0].message.content and whole.choices[0].finish_reason == "stop"
    chunks = list(ask(client, "What is the capital of France?", max_tokens=32, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streams_send_a_chunk_per_token_while_text_is_held(client):
    """The stop string makes the server hold back every " the" (it could start " the qqq"): those
    tokens still get their (empty) chunks, so a client's per-chunk timing stays per token."""
    kw = dict(model=MODEL, max_tokens=24, temperature=0, stop=[" the qqq"], extra_body={"ignore_eos": True},
              stream=True, stream_options={"include_usage": True})
    chunks = list(client.completions.create(prompt="Describe the weather here.", **kw))
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == chunks[-1].usage.completion_tokens == 24
    assert any(c.choices[0].text == "" for c in token_chunks)
    chat_kw = {k: v for k, v in kw.items() if k not in ("model", "temperature")}
    chat = list(ask(client, "Describe the weather here.", **chat_kw))
    assert len([c for c in chat if c.choices and c.choices[0].delta.content is not None]) == 1 + 24  # role chunk


def test_length_finish_and_text_completions(client):
    out = ask(client, "Write a long story about a dragon.", max_tokens=5)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    comp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                     logprobs=2)
    assert comp.usage.completion_tokens == 6 and len(comp.choices[0].logprobs.tokens) == 6
    assert "".join(comp.choices[0].logprobs.tokens) == comp.choices[0].text


def test_greedy_parity_with_hf(client, smollm2_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    hf = LlamaForCausalLM.from_pretrained(smollm2_checkpoint, torch_dtype=torch.float32).eval()
    for question in ["What is the capital of France?", "Name a primary color.", "What is 2 + 3?"]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
        answer = ask(client, question, max_tokens=24)
        assert answer.usage.prompt_tokens == len(ids)
        assert answer.choices[0].message.content == tokenizer.decode(ref, skip_special_tokens=True)


def test_batch_invariance(client):
    """16 concurrent greedy requests of different prompt lengths give exactly their solo tokens."""
    prompts = [f"Tell me one fact about {FACTS[i % 8]}." + " Please be brief." * (i % 5) for i in range(16)]

    def run(p):
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0, logprobs=0)
        return r.choices[0].logprobs.tokens

    alone = [run(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone


def first_content_latency(client, messages):
    start = time.perf_counter()
    ttft, usage = None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        usage = chunk.usage or usage
    return ttft, usage


def test_prefix_cache_reuses_a_shared_system_prompt(client, capsys):
    system = f"Session {time.time_ns()}. " + " ".join(f"Rule {i}: answer politely and briefly." for i in range(30))
    cold_ttft, cold = first_content_latency(client, [{"role": "system", "content": system},
                                                     {"role": "user", "content": "Hi!"}])
    warm_ttft, warm = first_content_latency(client, [{"role": "system", "content": system},
                                                     {"role": "user", "content": "Hello there!"}])
    assert cold.prompt_tokens >= 200
    assert cold.prompt_tokens_details.cached_tokens == 0
    assert warm.prompt_tokens_details.cached_tokens >= 192
    assert warm_ttft < cold_ttft
    with capsys.disabled():
        print(f"\nprefix cache: {cold.prompt_tokens}-token prompt, TTFT {cold_ttft * 1e3:.0f} ms cold; second request "
              f"{warm.prompt_tokens_details.cached_tokens} cached tokens, TTFT {warm_ttft * 1e3:.0f} ms")


def test_disconnect_returns_kv_blocks(server):
    assert server.metrics()["llama_aot_kv_blocks_used"] == 0
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.metrics()["llama_aot_kv_blocks_used"] > 0
    deadline = time.monotonic() + 15
    while server.metrics()["llama_aot_kv_blocks_used"] != 0:
        assert time.monotonic() < deadline, "KV blocks were not returned after the client disconnected"
        time.sleep(0.1)


def test_metrics_exposition(server, client):
    ask(client, "Hi", max_tokens=3)
    m = server.metrics()
    for name in ("llama_aot_kv_blocks_used", "llama_aot_kv_cache_usage_ratio", "llama_aot_prefix_cache_hit_rate",
                 "llama_aot_queue_depth", "llama_aot_time_to_first_token_seconds_count",
                 "llama_aot_inter_token_latency_seconds_count", "llama_aot_generation_tokens_total"):
        assert name in m, name
    assert m["llama_aot_time_to_first_token_seconds_count"] > 0 and m["llama_aot_generation_tokens_total"] > 0


def test_64_concurrent_streams(client, capsys):
    def run(i):
        start = time.perf_counter()
        n = 0
        for chunk in ask(client, f"Count from {i} upwards.", max_tokens=12, stream=True,
                         extra_body={"ignore_eos": True}):
            n += bool(chunk.choices and chunk.choices[0].delta.content)
        return time.perf_counter() - start, n

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(run, range(64)))
    latencies = sorted(t for t, _ in results)
    assert all(n > 0 for _, n in results)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    with capsys.disabled():
        print(f"\n64 concurrent streams x 12 tokens: p50 {p50:.2f} s, p99 {p99:.2f} s")


BAD_REQUESTS = [
    ("invalid json", b"{not json", 400, None),
    ("wrong type", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("bad role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("max_tokens 0", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens string", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ("temperature", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ("top_p", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("n", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ("n too large", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 129}, 400, "n"),
    ("malformed tools", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, None),
    ("unknown model", {"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("too long", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages"),
    ("prompt + max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "messages"),
]


@pytest.mark.parametrize("name, body, status, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server, name, body, status, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param


def test_n_choices_share_one_prefill_of_the_prompt(client):
    """n=4: four choices, the prompt counted once and found in the prefix cache by the later
    choices; with a seed they differ from one another, the request repeats exactly, and streamed
    it gives the same choices."""
    question = "Write one sentence about the sea, the wind and a small boat leaving the harbour at dawn."
    kw = dict(max_tokens=12, temperature=1.0, seed=7, n=4)
    reply = ask(client, question, **kw)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1 and all(texts)
    solo = ask(client, question, max_tokens=1)
    assert reply.usage.prompt_tokens == solo.usage.prompt_tokens
    lengths = [12 if c.finish_reason == "length" else None for c in reply.choices]
    assert 4 <= reply.usage.completion_tokens <= 48
    if None not in lengths:
        assert reply.usage.completion_tokens == 48
    assert reply.usage.prompt_tokens_details.cached_tokens >= reply.usage.prompt_tokens - 16
    assert [c.message.content for c in ask(client, question, **kw).choices] == texts
    text = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=6, temperature=1.0, seed=3, n=3)
    assert [c.index for c in text.choices] == [0, 1, 2] and text.usage.completion_tokens <= 18

    # Streamed, the choices' chunks interleave with their indexes and add up to the same texts.
    chunks = list(ask(client, question, stream=True, stream_options={"include_usage": True}, **kw))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(4)]
    assert streamed == texts
    finishes = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finishes == [0, 1, 2, 3] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    text_chunks = list(client.completions.create(model=MODEL, prompt="The sea is", max_tokens=6, temperature=1.0,
                                                 seed=3, n=3, stream=True))
    pieces = ["".join(c.choices[0].text for c in text_chunks if c.choices[0].index == i) for i in range(3)]
    assert pieces == [c.text for c in text.choices]


def test_tokenize_and_detokenize_as_vllm_and_sglang_serve_them(server, client, smollm2_artifact):
    """The server's own token counts: a prompt as HF's tokenizer splits it, chat messages as the
    chat route counts them (its usage.prompt_tokens), and the ids back to text."""
    post = lambda route, body: httpx.post(server.base_url + route, json=body, timeout=30)  # noqa: E731
    text = "Count these tokens, please."
    got = post("/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    hf = AutoTokenizer.from_pretrained(smollm2_artifact)
    assert got["tokens"] == hf(text)["input_ids"] and got["count"] == len(got["tokens"])
    assert got["token_strs"] == hf.convert_ids_to_tokens(got["tokens"]) and got["max_model_len"] > 0
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = post("/tokenize", {"model": MODEL, "messages": messages}).json()
    assert chat["count"] == ask(client, messages[0]["content"], max_tokens=1).usage.prompt_tokens
    back = post("/detokenize", {"model": MODEL, "tokens": got["tokens"]}).json()
    assert back["prompt"] == back["text"] == hf.decode(got["tokens"])

    for route, body, param in [("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
                               ("/tokenize", {"messages": messages, "add_special_tokens": True}, "add_special_tokens"),
                               ("/tokenize", {"prompt": 5}, "prompt"),
                               ("/detokenize", {"tokens": [1, 10 ** 9]}, "tokens"),
                               ("/detokenize", {"model": "gpt-17", "tokens": [1]}, "model")]:
        r = post(route, body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


def test_server_still_serves_after_bad_requests(client):
    assert ask(client, "Say yes.", max_tokens=3).usage.completion_tokens > 0


def test_api_key(smollm2_artifact):
    proc = ServerProcess(smollm2_artifact, "--api-key", "s3cret")
    try:
        denied = httpx.get(proc.base_url + "/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(proc.base_url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(proc.base_url + "/health").status_code == 200
        ok = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in ok.models.list().data] == [MODEL]
    finally:
        proc.stop()


def test_sigterm_lets_a_request_in_flight_finish(smollm2_artifact):
    proc = ServerProcess(smollm2_artifact)
    client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    chunks = ask(client, "Tell me a story.", max_tokens=20, stream=True, extra_body={"ignore_eos": True})
    first = next(chunks)
    proc.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)
    reasons = [c.choices[0].finish_reason for c in [first, *rest] if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    assert proc.proc.wait(60) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(proc.base_url + "/health")
    # The start-up line says where the start-up time went.
    assert re.search(r"loaded \S+ in [\d.]+ s, ready [\d.]+ s after launch \(files [\d.]+ s, program [\d.]+ s, "
                     r"weights [\d.]+ s, engine [\d.]+ s, first step \d+ ms\)", proc.proc.stdout.read())
