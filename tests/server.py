"""Starting `llama-serve` as users do, in a subprocess, and waiting until it answers."""
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx

from llama_aot.bench.server_process import free_port


class ServerProcess:
    def __init__(self, artifact, *flags, startup_timeout=120):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("llama-serve", path=os.path.dirname(sys.executable))
        self.proc = subprocess.Popen([exe, str(artifact), "--port", str(self.port), "--log-level", "warning", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-serve exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("llama-serve did not become healthy in time")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
