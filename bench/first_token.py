"""Time from launching `llama-serve` to its first generated token, as a user would measure it.

    python -m llama_aot.bench.first_token ARTIFACT [llama-serve flags...]

Starts the server, polls with a one-token streamed completion until a token arrives, prints the
server's own start-up line and the elapsed seconds, then stops the server with SIGTERM.
"""
from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

from llama_aot.bench.server_process import ServerProcess


def _first_token(base_url: str) -> bool:
    body = json.dumps({"prompt": "Hello", "max_tokens": 1, "stream": True}).encode()
    request = urllib.request.Request(base_url + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return any(line.startswith(b"data: {") for line in response)
    except (urllib.error.URLError, ConnectionError):
        return False


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    start = time.perf_counter()
    server = ServerProcess(argv)
    try:
        while not _first_token(server.base_url):
            if (failure := server.failure()) is not None:
                print(failure, file=sys.stderr)
                return 1
            time.sleep(0.1)
        elapsed = time.perf_counter() - start
    finally:
        server.stop()
    print("\n".join(line for line in server.output().splitlines() if line.startswith("llama-serve:")))
    print(f"first token {elapsed:.1f} s after launching llama-serve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
