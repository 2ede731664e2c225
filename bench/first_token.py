"""Time from launching `llama-serve` to its first generated token, as a user would measure it.

    python -m llama_aot.bench.first_token ARTIFACT [llama-serve flags...]

Starts the server, polls with a one-token streamed completion until a token arrives, prints the
server's own start-up line and the elapsed seconds, then stops the server with SIGTERM.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = _free_port()
    exe = shutil.which("llama-serve", path=os.path.dirname(sys.executable)) or "llama-serve"
    start = time.perf_counter()
    proc = subprocess.Popen([exe, *argv, "--port", str(port), "--log-level", "warning"], stderr=subprocess.PIPE,
                            text=True)
    try:
        while not _first_token(f"http://127.0.0.1:{port}"):
            if proc.poll() is not None:
                print(f"llama-serve exited with {proc.returncode}: {proc.stderr.read()}", file=sys.stderr)
                return 1
            time.sleep(0.1)
        elapsed = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    print("\n".join(line for line in err.splitlines() if line.startswith("llama-serve:")))
    print(f"first token {elapsed:.1f} s after launching llama-serve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
