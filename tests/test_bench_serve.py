"""`llama-bench serve`: the sampling rules, arrival times and metrics on synthetic data, bad servers
(stopped, garbage SSE, non-200) that must end in a printed summary, bench_serving's command lines
and result table, and small live runs against the embedded default (served under the name SGLang's
Llama 3.1 docs benchmark) whose token counts must agree with the server's usage."""
import contextlib
import json
import math
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llama_aot.bench import cli, serving
from llama_aot.bench.datasets import (RemoteTokenizer, load_conversations, load_tokenizer, sample_lengths,
                                      sample_random, sample_sharegpt)
from llama_aot.bench.report import format_table
from llama_aot.bench.sweep import chosen_scenarios, seed_scenarios
from llama_aot.bench.serving import RequestResult, arrival_gaps, compute_metrics, peak_rates
from llama_aot.bench.server_process import free_port
from server import ServerProcess

# The two bench_serving command lines of SGLang's Llama 3.1 docs (the cookbook's low-concurrency
# run and the 70B guide's), which must run as `llama-bench serve ...` unchanged.
COOKBOOK = ("--backend sglang --model Meta-Llama/Llama-3.1-70B --dataset-name random --random-input-len 1000 "
            "--random-output-len 1000 --num-prompts 10 --max-concurrency 1")
GUIDE = "--backend sglang --num-prompt 100 --host 127.0.0.1 --port 8000"
SERVED_NAME = "Meta-Llama/Llama-3.1-70B"

# bench_serving's (SGLang 0.5.6) result table, row labels and rules in order, as the cookbook
# prints it, less "Total input vision tokens" (no images are sent, so no figure is measured).
BENCH_SERVING_LAYOUT = """\
============ Serving Benchmark Result ============
Backend:
Traffic request rate:
Max request concurrency:
Successful requests:
Benchmark duration (s):
Total input tokens:
Total input text tokens:
Total generated tokens:
Total generated tokens (retokenized):
Request throughput (req/s):
Input token throughput (tok/s):
Output token throughput (tok/s):
Peak output token throughput (tok/s):
Peak concurrent requests:
Total token throughput (tok/s):
Concurrency:
----------------End-to-End Latency----------------
Mean E2E Latency (ms):
Median E2E Latency (ms):
---------------Time to First Token----------------
Mean TTFT (ms):
Median TTFT (ms):
P99 TTFT (ms):
-----Time per Output Token (excl. 1st token)------
Mean TPOT (ms):
Median TPOT (ms):
P99 TPOT (ms):
---------------Inter-Token Latency----------------
Mean ITL (ms):
Median ITL (ms):
P95 ITL (ms):
P99 ITL (ms):
Max ITL (ms):
==================================================""".splitlines()

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly hum".split()


def _pairs(n=40, seed=1):
    rng = random.Random(seed)
    return [(" ".join(rng.choices(WORDS, k=rng.randint(3, 40))), " ".join(rng.choices(WORDS, k=rng.randint(1, 40))))
            for _ in range(n)]


def _sharegpt_json(tmp_path, pairs):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"id": str(i), "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]}
                                for i, (p, r) in enumerate(pairs)] + [{"id": "short", "conversations": []}]))
    return path


def test_random_lengths_follow_bench_serving_rule():
    rng = random.Random(0)
    lengths = sample_lengths(100, 0.25, 5000, rng)
    assert min(lengths) == 25 and max(lengths) == 100
    assert sample_lengths(100, 0.25, 50, random.Random(3)) == sample_lengths(100, 0.25, 50, random.Random(3))
    assert set(sample_lengths(3, 0.1, 200, random.Random(0))) == {1, 2, 3}  # low end clamps to 1
    assert sample_lengths(7, 1.0, 10, random.Random(0)) == [7] * 10


def test_poisson_arrivals_are_seeded_with_the_right_rate():
    gaps = arrival_gaps(20000, 4.0, seed=7)
    assert gaps == arrival_gaps(20000, 4.0, seed=7) and gaps != arrival_gaps(20000, 4.0, seed=8)
    assert min(gaps) > 0 and abs(sum(gaps) / len(gaps) - 0.25) < 0.01
    assert arrival_gaps(5, math.inf, seed=0) == [0.0] * 5


def test_metrics_on_synthetic_timings():
    ok = [RequestResult(prompt_len=10 * (i + 1), output_len=5, ttft=0.1 * (i + 1), latency=0.1 * (i + 1) + 0.4,
                        itl=[0.1] * 4) for i in range(10)]
    failed = [RequestResult(prompt_len=3, error="HTTP 503: busy"), RequestResult(prompt_len=3, error="HTTP 503: busy")]
    m = compute_metrics(ok + failed, duration_s=2.0)
    assert (m.completed, m.failed, m.failures) == (10, 2, {"HTTP 503: busy": 2})
    assert (m.total_input, m.total_output) == (550, 50)
    assert m.request_throughput == 5.0 and m.output_throughput == 25.0 and m.total_throughput == 300.0
    assert m.ttft.mean == pytest.approx(550.0) and m.ttft.median == pytest.approx(550.0)
    assert m.ttft.p95 == pytest.approx(955.0) and m.ttft.p99 == pytest.approx(991.0)
    assert m.tpot.mean == pytest.approx(100.0) and m.itl.max == pytest.approx(100.0)
    assert m.concurrency == pytest.approx(sum(r.latency for r in ok) / 2.0)
    table = format_table(m, "llama-aot", math.inf, 4)
    lines = table.splitlines()
    assert lines[0] == "=" * 12 + " Serving Benchmark Result " + "=" * 12 and len(lines[0]) == 50
    assert "{:<40} {:<10.2f}".format("Mean TTFT (ms):", 550.0) in lines
    assert "-----Time per Output Token (excl. 1st token)------" in lines and "Max ITL (ms):" in table
    assert "     2 x HTTP 503: busy" in lines and lines[-1] == "=" * 50


def test_peaks_count_chunks_and_requests_per_second_bucket():
    a = RequestResult(prompt_len=1, output_len=3, start=10.0, ttft=0.5, itl=[0.2, 0.2], latency=1.0)  # 10.5 .. 11.0
    b = RequestResult(prompt_len=1, output_len=6, start=11.2, ttft=0.1, itl=[0.1] * 5, latency=1.0)  # 11.3 .. 12.2
    assert peak_rates([a, b]) == (6.0, 2)  # b's six chunks in second 1; both in flight in second 1
    assert peak_rates([]) == (0.0, 0)
    m = compute_metrics([a, b, RequestResult(prompt_len=1, error="x")], duration_s=2.2, retokenized_output=8)
    assert (m.peak_output_throughput, m.peak_concurrency, m.total_output_retokenized) == (6.0, 2, 8)


def _rows(table: str) -> dict[str, str]:
    return {line[:40].rstrip(): line[41:].rstrip() for line in table.splitlines() if line[:1] not in "=-"}


def test_table_is_bench_serving_layout_line_for_line():
    ok = [RequestResult(prompt_len=5, output_len=4, start=0.1 * i, ttft=0.05, itl=[0.01] * 3, latency=0.08,
                        generated_text="abc") for i in range(4)]
    m = compute_metrics(ok, duration_s=0.5, retokenized_output=15)
    lines = format_table(m, "sglang", math.inf, 1).splitlines()
    labels = [line if line[:1] in "=-" else line[:41] for line in lines]
    assert labels == [line if line[:1] in "=-" else f"{line:<40} " for line in BENCH_SERVING_LAYOUT]
    assert lines[1] == "Backend:                                 sglang    "  # bench_serving pads values to 10
    rows = _rows("\n".join(lines))
    assert rows["Traffic request rate:"] == "inf" and rows["Max request concurrency:"] == "1"
    assert rows["Total generated tokens (retokenized):"] == "15" and rows["Peak concurrent requests:"] == "4"
    assert rows["Peak output token throughput (tok/s):"] == "16.00"  # all four streams end within second 0
    assert rows["Total input text tokens:"] == rows["Total input tokens:"] == "20"
    assert _rows(format_table(m, "vllm-chat", 20.0, None))["Traffic request rate:"] == "20.0"  # its float, unrounded
    unmeasured = compute_metrics(ok, duration_s=0.5)  # no tokenizer: no retokenized row rather than a made-up one
    assert "Total generated tokens (retokenized):" not in format_table(unmeasured, "sglang", math.inf, None)


def test_bench_serving_command_lines_parse():
    a = cli.parse_args(["serve", *COOKBOOK.split()])
    assert (a.backend, a.model, a.dataset, a.random_input_len, a.random_output_len, a.num_prompts,
            a.max_concurrency) == ("sglang", SERVED_NAME, "random", 1000, 1000, 10, 1)
    assert (a.tokenizer, a.random_range_ratio, a.request_rate, cli.base_url(a)) == (
        None, 0.0, math.inf, "http://127.0.0.1:8000")  # bench_serving's defaults; llama-serve's address
    cfg = cli.serve_config(a, a.max_concurrency)
    assert (cfg.model, cfg.route) == (SERVED_NAME, "/v1/completions")
    g = cli.parse_args(["serve", *GUIDE.split()])  # --num-prompt: argparse's prefix of --num-prompts
    assert (g.num_prompts, g.dataset, g.max_concurrency, cli.base_url(g)) == (100, "sharegpt", None,
                                                                                "http://127.0.0.1:8000")
    assert cli.parse_args(["serve", "--dataset", "random"]).dataset == "random"  # our old name still works
    assert cli.serve_config(cli.parse_args(["serve", "--backend", "vllm", "--chat"])).backend == "vllm-chat"
    assert cli.serve_config(cli.parse_args(["serve", "--backend", "openai-chat"])).route == "/v1/chat/completions"
    with_url = cli.parse_args(["serve", "--base-url", "http://h:1/", "--port", "9"])
    assert cli.serve_config(with_url).base_url == "http://h:1"  # --base-url wins over --host/--port


def test_metrics_with_no_successes_are_zero():
    m = compute_metrics([RequestResult(prompt_len=1, error="x")], duration_s=0.0)
    assert m.completed == 0 and m.request_throughput == 0.0 and m.ttft.p99 == 0.0
    assert "Successful requests:" in format_table(m, "llama-aot", 2.0, None)


def test_datasets_are_seeded_and_filtered(smollm2_checkpoint):
    tok = load_tokenizer(smollm2_checkpoint)
    pairs = _pairs()
    reqs = sample_random(tok, pairs, 12, input_len=64, output_len=8, range_ratio=0.5, seed=3)
    assert reqs == sample_random(tok, pairs, 12, 64, 8, 0.5, seed=3)
    for r in reqs:
        assert 4 <= r.output_len <= 8 and abs(r.prompt_len - len(tok.encode(r.prompt, add_special_tokens=False).ids)) == 0
        assert 28 <= r.prompt_len <= 68  # cut or repeated to 32..64 tokens; re-encoding may shift a few
    share = sample_sharegpt(tok, pairs, 10, context_len=60, seed=0)
    assert share == sample_sharegpt(tok, pairs, 10, context_len=60, seed=0)
    assert all(r.prompt_len >= 4 and r.output_len >= 4 and r.prompt_len + r.output_len <= 60 for r in share)
    assert {r.output_len for r in sample_sharegpt(tok, pairs, 5, 200, seed=0, output_len=6)} == {6}


def test_truncated_sharegpt_json_keeps_whole_records(tmp_path):
    path = _sharegpt_json(tmp_path, _pairs(5))
    text = path.read_text()
    path.write_text(text[: text.index('"id": "3"') + 20])  # the wheel's json ends mid-record like this
    assert load_conversations(path) == _pairs(5)[:3]


def _bench(capsys, *argv):
    start = time.monotonic()
    code = cli.main(["serve", *argv])
    out, err = capsys.readouterr()
    return code, out, err, time.monotonic() - start


def test_stopped_server_reports_failures_within_timeout(smollm2_checkpoint, tmp_path, capsys):
    path = _sharegpt_json(tmp_path, _pairs())
    code, out, err, elapsed = _bench(capsys, "--base-url", f"http://127.0.0.1:{free_port()}", "--tokenizer",
                                     str(smollm2_checkpoint), "--dataset-path", str(path), "--dataset", "random",
                                     "--num-prompts", "4", "--random-input-len", "16", "--random-output-len", "4",
                                     "--timeout", "5")
    assert code == 0 and elapsed < 10 and "Traceback" not in out + err
    assert "Successful requests:                     0" in out
    assert "4 x GET /v1/models: ConnectError" in out


class _Garbage(BaseHTTPRequestHandler):
    """Speaks just enough OpenAI to be benchmarked: models, then whatever stream a test asks for."""

    reply = b"data: {not json\n\n"
    status = 200
    stall = False
    released = None  # a threading.Event set when the test ends: a stalled reply waits for it, not for a clock

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"data": [{"id": "fake", "max_model_len": 512}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.stall:
            self.released.wait()
        self.send_response(self.status)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(self.reply)))
        self.end_headers()
        self.wfile.write(self.reply)


class _QuietServer(ThreadingHTTPServer):
    """A client that gave up (the benchmark's timeout) breaks the pipe under a late reply; that is the test's
    point, not an error, and socketserver's default report would land as a traceback in a later test's capture."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def _fake_server(**replies):
    """Serves _Garbage with the given class attributes; on exit releases stalled replies and stops serving."""
    released = threading.Event()
    httpd = _QuietServer(("127.0.0.1", 0), type("Handler", (_Garbage,), {**replies, "released": released}))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_port
    finally:
        released.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("status, reply, reason", [
    (200, b"data: {not json\n\n", "malformed stream: data is not JSON"),
    ("stall", b"", "timeout after 1 s"),
    (200, b"garbage\n\n", "malformed stream: not an SSE data line"),
    (200, b'data: {"choices": [{"text": "hi"}]}\n\n', "malformed stream: stream ended before data: [DONE]"),
    (200, b'data: {"choices": [{"text": "hi"}]}\n\ndata: [DONE]\n\n', "malformed stream: no usage chunk"),
    (500, b'{"error": {"message": "boom"}}', "HTTP 500: boom"),
])
def test_bad_server_responses_are_failures_with_reasons(smollm2_checkpoint, tmp_path, capsys, status, reply, reason):
    stall = status == "stall"  # held until the test ends, far past --timeout 1: only the timeout can end it
    with _fake_server(reply=reply, status=200 if stall else status, stall=stall) as port:
        path = _sharegpt_json(tmp_path, _pairs())
        code, out, err, elapsed = _bench(capsys, "--base-url", f"http://127.0.0.1:{port}", "--tokenizer",
                                         str(smollm2_checkpoint), "--dataset-path", str(path), "--num-prompts", "3",
                                         "--timeout", "1")
    assert code == 0 and elapsed < 10 and "Traceback" not in out + err, out + err
    assert f"3 x not sent, warmup failed: {reason}" in out and "Successful requests:" in out, out


@pytest.mark.parametrize("flag, value, message", [
    ("--num-prompts", "0", "argument --num-prompts: '0': give a positive integer"),
    ("--backend", "tgi", "argument --backend: invalid choice: 'tgi'"),
    ("--port", "70000", "give a port between 1 and 65535"),
    ("--random-range-ratio", "2", "give a ratio in [0, 1]"),
    ("--request-rate", "fast", "'fast' is not a number"),
])
def test_bad_cli_input_is_one_line_exit_2(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--base-url", "http://127.0.0.1:1", "--tokenizer", ".", flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_url_or_tokenizer_is_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["serve", "--base-url", "localhost:8000", "--tokenizer", "."]) == 2
    assert cli.main(["serve", "--base-url", "http://127.0.0.1:1", "--tokenizer", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "--base-url must start with http://" in lines[0] and "tokenizer.json not found" in lines[1]


def test_sweep_has_the_seed_scenarios_and_scales_down():
    full = seed_scenarios()
    assert [(s.dataset, s.input_len, s.output_len, s.concurrency) for s in full] == [
        ("random", 1000, 1000, 1), ("random", 1000, 1000, 16), ("random", 1000, 1000, 100),
        ("random", 8000, 1000, 1), ("random", 8000, 1000, 16), ("random", 8000, 1000, 64), ("sharegpt", 0, 0, None)]
    assert full[-1].num_prompts == 100 and full[2].num_prompts == 400
    small = seed_scenarios(0.02)
    assert [s.name for s in small] == ["random-20-20-c1", "random-20-20-c2", "random-160-20-c1", "random-160-20-c2",
                                       "sharegpt-2"]


def test_sweep_runs_the_chosen_scenarios_in_the_given_order(tmp_path, capsys):
    chosen = chosen_scenarios(["random-8000-1000-c64", "sharegpt-100", "random-8000-1000-c64"])
    assert [(s.input_len, s.concurrency, s.num_prompts) for s in chosen] == [(8000, 64, 256), (0, None, 100)]
    code = cli.main(["sweep", "--base-url", "http://127.0.0.1:1", "--tokenizer", str(tmp_path), "--scale", "0.02",
                     "--scenarios", "random-20-20-c1,random-1000-1000-c100", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown scenario random-1000-1000-c100" in err[0], err
    assert "random-20-20-c2" in err[0] and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def llama_serve(smollm2_artifact):
    """llama-serve with the embedded default, under the model id the SGLang docs' commands send."""
    server = ServerProcess(smollm2_artifact, "--served-model-name", SERVED_NAME)
    yield server
    server.stop()


def _bos(tok) -> int:
    return len(tok.encode("a", add_special_tokens=True).ids) - len(tok.encode("a", add_special_tokens=False).ids)


def _remote_tokenizers(monkeypatch) -> list:
    """Collects the tokenizers the bench makes, to see which kind counted the tokens and what it cost."""
    made, real = [], cli.bench_tokenizer
    monkeypatch.setattr(cli, "bench_tokenizer", lambda args, cfg: made.append(real(args, cfg)) or made[-1])
    return made


def test_cookbook_command_line_counts_with_the_servers_tokenizer(llama_serve, smollm2_artifact, capsys, monkeypatch):
    made = _remote_tokenizers(monkeypatch)
    argv = COOKBOOK.replace("--random-input-len 1000", "--random-input-len 24").replace(
        "--random-output-len 1000", "--random-output-len 4").replace("--num-prompts 10", "--num-prompts 3").split()
    before = llama_serve.metrics()
    code, out, err, _ = _bench(capsys, *argv, "--port", str(llama_serve.port))
    after = llama_serve.metrics()
    assert code == 0 and "Traceback" not in out + err, out + err
    assert len(made) == 1 and isinstance(made[0], RemoteTokenizer) and made[0].calls > 0
    rows = _rows(out)
    assert (rows["Backend:"], rows["Max request concurrency:"], rows["Successful requests:"]) == ("sglang", "1", "3")
    # One at a time, but the peak is bench_serving's: requests touching one second, here all three.
    assert 1 <= int(rows["Peak concurrent requests:"]) <= 3 and float(rows["Peak output token throughput (tok/s):"]) > 0
    # The server's counts shaped the prompts exactly as the artifact's tokenizer.json would have
    # (range ratio 0, bench_serving's default: lengths anywhere in 1..24 and 1..4).
    tok = load_tokenizer(smollm2_artifact)
    requests = sample_random(tok, load_conversations(), 3, 24, 4, 0.0, seed=0)
    assert rows["Total generated tokens:"] == str(sum(r.output_len for r in requests))
    assert int(rows["Total generated tokens (retokenized):"]) > 0
    assert int(rows["Total input tokens:"]) == sum(r.prompt_len + _bos(tok) for r in requests)
    served_in = after["llama_aot_prompt_tokens_total"] - before["llama_aot_prompt_tokens_total"]
    assert served_in == sum(r.prompt_len + _bos(tok) for r in [requests[0], *requests])  # with the warmup


def test_guide_command_line_runs_sharegpt(llama_serve, capsys, monkeypatch):
    made = _remote_tokenizers(monkeypatch)
    argv = GUIDE.replace("--num-prompt 100", "--num-prompt 3").replace("--port 8000", f"--port {llama_serve.port}")
    code, out, err, _ = _bench(capsys, *argv.split(), "--sharegpt-output-len", "4", "--context-len", "96")
    assert code == 0 and "Traceback" not in out + err, out + err
    assert isinstance(made[0], RemoteTokenizer) and made[0].calls > 0
    rows = _rows(out)
    assert (rows["Backend:"], rows["Traffic request rate:"], rows["Max request concurrency:"]) == ("sglang", "inf",
                                                                                                  "not set")
    assert (rows["Successful requests:"], rows["Total generated tokens:"]) == ("3", "12")


def test_openai_chat_backend_drives_the_chat_route(llama_serve, smollm2_artifact, capsys, monkeypatch):
    sent, payload = [], serving._payload
    monkeypatch.setattr(serving, "_payload", lambda cfg, model, req: sent.append((cfg.route, model)) or
                        payload(cfg, model, req))
    code, out, err, _ = _bench(capsys, "--backend", "openai-chat", "--port", str(llama_serve.port), "--dataset-name",
                               "random", "--random-input-len", "16", "--random-output-len", "4", "--num-prompts", "2")
    assert code == 0 and "Traceback" not in out + err, out + err
    assert sent == [("/v1/chat/completions", SERVED_NAME)] * 3  # the warmup and the two requests
    out_lens = [r.output_len for r in sample_random(load_tokenizer(smollm2_artifact), load_conversations(), 2, 16, 4,
                                                    0.0, seed=0)]
    rows = _rows(out)
    assert (rows["Backend:"], rows["Successful requests:"], rows["Total generated tokens:"]) == (
        "openai-chat", "2", str(sum(out_lens)))


def test_a_model_the_server_does_not_serve_is_one_line_exit_2(llama_serve, capsys):
    code, out, err, elapsed = _bench(capsys, "--model", "meta-llama/Llama-3.1-8B", "--port", str(llama_serve.port),
                                     "--dataset-name", "random", "--random-input-len", "8", "--random-output-len", "2",
                                     "--num-prompts", "2")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Serving Benchmark Result" not in out, out + err
    assert lines[0].startswith("llama-bench: error: --model 'meta-llama/Llama-3.1-8B' is not served there")
    assert "HTTP 404" in lines[0] and SERVED_NAME in lines[0]  # the server's 404 says what it serves


def test_a_server_without_tokenize_asks_for_tokenizer(tmp_path, capsys):
    with _fake_server(reply=b'{"detail": "Not Found"}', status=404) as port:
        code, out, err, _ = _bench(capsys, "--port", str(port), "--dataset-path",
                                   str(_sharegpt_json(tmp_path, _pairs())), "--num-prompts", "2")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "/tokenize answered HTTP 404" in lines[0], err
    assert "pass --tokenizer DIR" in lines[0]


def test_live_runs_agree_with_usage(llama_serve, smollm2_artifact, tmp_path, capsys):
    server = llama_serve
    out_file = tmp_path / "runs.jsonl"
    before = server.metrics()
    code, out, err, _ = _bench(capsys, "--base-url", server.base_url, "--tokenizer", str(smollm2_artifact),
                               "--dataset", "random", "--num-prompts", "8", "--random-input-len", "32",
                               "--random-output-len", "8", "--random-range-ratio", "0.5", "--max-concurrency", "4",
                               "--output-file", str(out_file), "--plot")
    after = server.metrics()
    assert code == 0, err
    code, out2, err, _ = _bench(capsys, "--base-url", server.base_url, "--tokenizer", str(smollm2_artifact),
                                "--dataset", "sharegpt", "--num-prompts", "4", "--sharegpt-output-len", "6",
                                "--context-len", "160", "--chat", "--request-rate", "20",
                                "--output-file", str(out_file))
    assert code == 0, err
    print(out)
    random_run, sharegpt_run = [json.loads(line) for line in out_file.read_text().splitlines()]
    m = random_run["metrics"]
    assert (m["completed"], m["failed"]) == (8, 0) and "Serving Benchmark Result" in out
    args = cli.parse_args(["serve", "--base-url", server.base_url, "--tokenizer", str(smollm2_artifact)])
    requests = cli.build_requests(args, None, "random", 8, 32, 8, 0.5)
    tok = load_tokenizer(smollm2_artifact)
    bos = _bos(tok)
    warmup = requests[0]
    served_out = after["llama_aot_generation_tokens_total"] - before["llama_aot_generation_tokens_total"]
    served_in = after["llama_aot_prompt_tokens_total"] - before["llama_aot_prompt_tokens_total"]
    assert m["total_output"] == sum(r.output_len for r in requests) == served_out - warmup.output_len
    assert m["total_input"] == sum(r.prompt_len + bos for r in requests) == served_in - warmup.prompt_len - bos
    assert f"{'Total generated tokens:':<40} {m['total_output']:<10}" in out
    assert random_run["git_sha"] and random_run["device"] != "unknown" and random_run["model"]
    assert random_run["label"] == "random-32-8-c4" and sharegpt_run["label"] == "sharegpt-4-cinf-r20"
    assert (tmp_path / "runs-random-32-8-c4-latency.png").stat().st_size > 0
    s = sharegpt_run["metrics"]
    assert (s["completed"], s["failed"], s["total_output"]) == (4, 0, 24) and "Serving Benchmark Result" in out2
    assert _rows(out)["Backend:"] == "sglang" and _rows(out2)["Backend:"] == "sglang-oai-chat"  # --chat's twin
    assert m["total_output_retokenized"] > 0 and m["peak_concurrency"] >= 1  # in the JSONL record too

