"""`llama-serve` started as a user starts it, for the benchmarks that time it from outside: the
installed command on a free loopback port with warnings only, stopped with SIGTERM (and killed if
it has not exited 60 s later), its stderr kept for the caller."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, argv: list[str]):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("llama-serve", path=os.path.dirname(sys.executable)) or "llama-serve"
        self.proc = subprocess.Popen([exe, *argv, "--port", str(self.port), "--log-level", "warning"],
                                     stderr=subprocess.PIPE, text=True)

    def failure(self) -> str | None:
        """Why the server exited, if it has: its exit status and stderr."""
        if self.proc.poll() is None:
            return None
        return f"llama-serve exited with {self.proc.returncode}: {self.proc.stderr.read()}"

    def stop(self) -> str:
        """Stops the server and returns what it wrote to stderr."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err
