"""`python -m llama_aot.bench.http_overhead`: the real app over a stand-in engine, streamed to by
many clients at once; every token asked for must arrive as one chunk, and the cost is reported."""
import re

from llama_aot.bench import http_overhead


def test_every_token_arrives_and_the_cost_per_chunk_is_reported(capsys):
    assert http_overhead.main(["--streams", "4", "--tokens", "5", "--step-ms", "2"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"4 streams x 5 tokens: (\d+) chunks in [\d.]+ s; server CPU (\d+) us per chunk", out)
    assert found, out
    assert int(found.group(1)) == 20
