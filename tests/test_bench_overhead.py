"""The model-free overhead instruments: `bench/http_overhead.py` (the real app over a stand-in
engine, streamed to by many clients at once) and `bench/engine_overhead.py` (the real engine over
a stand-in program). Every token asked for must arrive, and each reports its cost."""
import re

from llama_aot.bench import engine_overhead, http_overhead


def test_http_overhead_gets_every_token_and_reports_the_cost_per_chunk(capsys):
    assert http_overhead.main(["--streams", "4", "--tokens", "5", "--step-ms", "2"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"4 streams x 5 tokens: (\d+) chunks in [\d.]+ s; server CPU (\d+) us per chunk", out)
    assert found, out
    assert int(found.group(1)) == 20


def test_engine_overhead_finishes_every_request_and_reports_the_step_cost(capsys):
    assert engine_overhead.main(["--batch", "1,3", "--tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [int(re.match(r"batch\s+(\d+):", line).group(1)) for line in lines] == [1, 3]
    for line in lines:
        step_ms, emit_ms = map(float, re.findall(r"([\d.]+) ms", line))
        assert 0 < emit_ms < step_ms
