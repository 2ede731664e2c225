"""`llama-serve` started as a user starts it, for the benchmarks that time it from outside and the
tests that talk to it: the installed command on a free loopback port with warnings only, stopped
with SIGTERM (and killed if it has not exited 60 s later). What it writes is kept for the caller:
its stderr, or with `merge_output` its stdout and stderr in one pipe, drained while it stops."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, argv: list[str], merge_output: bool = False):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("llama-serve", path=os.path.dirname(sys.executable)) or "llama-serve"
        self.proc = subprocess.Popen([exe, *argv, "--port", str(self.port), "--log-level", "warning"],
                                     stdout=subprocess.PIPE if merge_output else None,
                                     stderr=subprocess.STDOUT if merge_output else subprocess.PIPE, text=True)
        self._output = self.proc.stdout if merge_output else self.proc.stderr
        self._rest: str | None = None  # what it wrote that nobody had read, once stopped

    def failure(self) -> str | None:
        """Why the server exited, if it has: its exit status and what it wrote."""
        if self.proc.poll() is None:
            return None
        return f"llama-serve exited with {self.proc.returncode}: {self._output.read()}"

    def wait_healthy(self, timeout: float) -> None:
        """Returns once /health answers 200; raises RuntimeError if the server exits first (with
        failure()'s text) or `timeout` seconds pass (the server is stopped then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (failure := self.failure()) is not None:
                raise RuntimeError(failure)
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama-serve did not become healthy in {timeout:.0f} s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Stops the server with `sig` (killed if it has not exited `timeout` s later); its exit
        status. Reads its output while it shuts down: a server whose pipe is full would block on
        its next write and never exit."""
        if self._rest is not None:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            written = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            written = self.proc.communicate()
        self._rest = "".join(w for w in written if w)
        return self.proc.returncode

    def output(self) -> str:
        """What the server wrote and nobody read, once it has exited (stopped, or by itself)."""
        if self._rest is None:
            self.stop()
        return self._rest
