"""Starting `llama-serve` as users do, in a subprocess, and waiting until it answers: the
benchmarks' ServerProcess with stdout and stderr in one pipe, which the tests read."""
import httpx

from llama_aot.bench.server_process import ServerProcess as BenchServerProcess


class ServerProcess(BenchServerProcess):
    def __init__(self, artifact, *flags, startup_timeout=120):
        super().__init__([str(artifact), *flags], merge_output=True)
        self.wait_healthy(startup_timeout)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values
