"""`llama-bench serve`: the sampling rules, arrival times and metrics on synthetic data, bad servers
(stopped, garbage SSE, non-200) that must end in a printed summary, and a small live run against
the embedded default whose token counts must agree with the server's usage."""
import json
import math
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llama_aot.bench import cli
from llama_aot.bench.datasets import load_conversations, load_tokenizer, sample_lengths, sample_random, sample_sharegpt
from llama_aot.bench.report import format_table
from llama_aot.bench.sweep import chosen_scenarios, seed_scenarios
from llama_aot.bench.serving import RequestResult, arrival_gaps, compute_metrics
from server import ServerProcess, free_port

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
    stall = 0.0

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
        time.sleep(self.stall)
        self.send_response(self.status)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(self.reply)))
        self.end_headers()
        self.wfile.write(self.reply)


@pytest.mark.parametrize("status, reply, reason", [
    (200, b"data: {not json\n\n", "malformed stream: data is not JSON"),
    ("stall", b"", "timeout after 1 s"),
    (200, b"garbage\n\n", "malformed stream: not an SSE data line"),
    (200, b'data: {"choices": [{"text": "hi"}]}\n\n', "malformed stream: stream ended before data: [DONE]"),
    (200, b'data: {"choices": [{"text": "hi"}]}\n\ndata: [DONE]\n\n', "malformed stream: no usage chunk"),
    (500, b'{"error": {"message": "boom"}}', "HTTP 500: boom"),
])
def test_bad_server_responses_are_failures_with_reasons(smollm2_checkpoint, tmp_path, capsys, status, reply, reason):
    stall = 30.0 if status == "stall" else 0.0  # far past --timeout 1: only the timeout can end it
    handler = type("Handler", (_Garbage,), {"reply": reply, "status": 200 if stall else status, "stall": stall})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        path = _sharegpt_json(tmp_path, _pairs())
        code, out, err, elapsed = _bench(capsys, "--base-url", f"http://127.0.0.1:{httpd.server_port}", "--tokenizer",
                                         str(smollm2_checkpoint), "--dataset-path", str(path), "--num-prompts", "3",
                                         "--timeout", "1")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert code == 0 and elapsed < 10 and "Traceback" not in out + err, out + err
    assert f"3 x not sent, warmup failed: {reason}" in out and "Successful requests:" in out, out


@pytest.mark.parametrize("flag, value, message", [
    ("--num-prompts", "0", "argument --num-prompts: '0': give a positive integer"),
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


def test_live_runs_agree_with_usage(smollm2_artifact, tmp_path, capsys):
    server = ServerProcess(smollm2_artifact)
    out_file = tmp_path / "runs.jsonl"
    try:
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
    finally:
        server.stop()
    print(out)
    random_run, sharegpt_run = [json.loads(line) for line in out_file.read_text().splitlines()]
    m = random_run["metrics"]
    assert (m["completed"], m["failed"]) == (8, 0) and "Serving Benchmark Result" in out
    args = cli.parse_args(["serve", "--base-url", server.base_url, "--tokenizer", str(smollm2_artifact)])
    requests = cli.build_requests(args, None, "random", 8, 32, 8, 0.5)
    tok = load_tokenizer(smollm2_artifact)
    bos = len(tok.encode("a", add_special_tokens=True).ids) - len(tok.encode("a", add_special_tokens=False).ids)
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

