"""Pull speed on loopback: `llama-artifacts pull` against `curl` from the same server, in one run.

    python -m llama_aot.bench.pull_speed [--mb 1024] [--rounds 3] [--connections 8] [--work DIR] [--out-dir DIR]

Makes an artifact-like store of random bytes (a manifest in the real format, one weights file of
most of --mb, a 64 MB package, a 2 MB tokenizer), publishes it, serves the store with uvicorn and
starlette's StaticFiles (the server the tests use) in a process of its own, and times in alternating
rounds, each from launch to exit into an empty directory:
  - curl fetching every blob over one connection (`curl -o F URL -o F URL ...`, as a user would),
  - curl fetching them in parallel (`curl --parallel`),
  - `llama-artifacts pull STORE:NAME -o DIR` with an empty cache: ranged requests on --connections
    connections, every chunk hashed as it lands, the artifact renamed into place.
Pull also reports its own time from the first request to the artifact in place, which leaves out
starting Python (~0.15 s). The ratios are curl's median time over pull's: 1.0 means as fast as curl.
Each run's CPU seconds (user + system) are recorded too, the client's and the server's, since on a
machine with few cores they share them: wall times alone do not say who was waiting on whom.
Saved as JSON in bench/results/ with the git sha and device "cpu".
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llama_aot.artifacts.config import BuildConfig, ModelConfig
from llama_aot.artifacts.digest import hash_files
from llama_aot.artifacts.manifest import FORMAT_VERSION, Manifest, ProgramSpec
from llama_aot.artifacts.publish import publish
from llama_aot.artifacts.step_abi import STEP_INPUTS
from llama_aot.artifacts.store_ref import INDEX_FILE
from llama_aot.bench.results import save_results
from llama_aot.compiler.package import git_sha

NAME = "random-1g"
SERVER = """
import sys, uvicorn
from starlette.staticfiles import StaticFiles
uvicorn.run(StaticFiles(directory=sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def write_random_artifact(out: Path, total_mb: int) -> Path:
    """An artifact directory that passes the manifest's checks, its files random bytes."""
    out.mkdir(parents=True)
    sizes = {"step.pt2": 64 << 20, "tokenizer.json": 2 << 20}
    sizes["step.rank0.safetensors"] = max(1 << 20, (total_mb << 20) - sum(sizes.values()))
    for name, size in sizes.items():
        with open(out / name, "wb") as f:
            for offset in range(0, size, 64 << 20):
                f.write(os.urandom(min(64 << 20, size - offset)))
    import torch

    model = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=256,
                        tie_word_embeddings=False)
    manifest = Manifest(
        producer={"package": "llama-aot", "version": "bench", "git_sha": git_sha(), "torch": torch.__version__,
                  "triton": None},
        target={"device_type": "cpu", "arch": f"{platform.machine()}-bench", "device_name": "random bytes",
                "world_size": 1},
        model=model, build=BuildConfig(), input_hash="random", programs=(ProgramSpec.named("step", STEP_INPUTS, 1),),
        quantization={}, passes=(), verification={}, files=hash_files(out, sorted(sizes)))
    assert manifest.to_dict()["format_version"] == FORMAT_VERSION
    manifest.write(out)
    return out


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/{INDEX_FILE}", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the store server did not start")


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU of the children waited for (pid None), or of the running process `pid`."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], server_pid: int, env=None) -> tuple[float, float, float, str]:
    """Wall seconds, the command's CPU seconds and the server's, and the command's output."""
    cpu, server_cpu, start = cpu_seconds(), cpu_seconds(server_pid), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, cpu_seconds() - cpu, cpu_seconds(server_pid) - server_cpu, done.stdout + done.stderr


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_aot.bench.pull_speed", description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=1024, help="artifact size in MiB")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args(argv)
    if shutil.which("curl") is None:
        print("pull_speed: error: curl is not installed", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="pull-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        artifact = write_random_artifact(work / NAME, args.mb)
        entry = publish(artifact, str(work / "store"), NAME).entry
        shutil.rmtree(artifact)
        server, url = start_server(work / "store")
        blobs = [(f, d["root_sha256"]) for f, d in entry.files.items()]
        curl = ["curl", "-sS", "--fail"] + [a for f, key in blobs for a in ("-o", f, f"{url}/blobs/{key}")]
        pull = [str(Path(sys.executable).parent / "llama-artifacts"), "pull", f"{url}:{NAME}",
                "--connections", str(args.connections), "-o"]
        times: dict[str, list[float]] = {"curl": [], "curl_parallel": [], "pull": [], "pull_transfer": []}
        cpu = {k: [] for k in ("curl", "curl_parallel", "pull")}
        server_cpu = {k: [] for k in ("curl", "curl_parallel", "pull")}
        for r in range(args.rounds):
            for kind in ("curl", "curl_parallel", "pull"):
                scratch = work / f"round{r}-{kind}"
                scratch.mkdir()
                if kind == "pull":
                    env = {**os.environ, "LLAMA_AOT_CACHE": str(scratch / "cache")}
                    seconds, used, served, out = timed(pull + [str(scratch / NAME)], server.pid, env)
                    transfer = float(re.search(r"received [\d.]+ MB in ([\d.]+) s", out).group(1))
                    times["pull_transfer"].append(transfer)
                else:
                    cmd = curl + (["--parallel", "--parallel-max", str(args.connections)] if kind != "curl" else [])
                    start = os.getcwd()
                    os.chdir(scratch)
                    try:
                        seconds, used, served, _ = timed(cmd, server.pid)
                    finally:
                        os.chdir(start)
                times[kind].append(seconds)
                cpu[kind].append(used)
                server_cpu[kind].append(served)
                shutil.rmtree(scratch)
                detail = f" (transfer {transfer:.2f} s)" if kind == "pull" else ""
                detail += f", CPU {used:.2f} s, server CPU {served:.2f} s"
                print(f"round {r}: {kind} {seconds:.2f} s{detail}", flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mb = entry.size / 1e6
    import starlette
    import uvicorn

    record = {"device": "cpu", "git_sha": git_sha(), "cpus": len(os.sched_getaffinity(0)), "bytes": entry.size,
              "rounds": args.rounds, "connections": args.connections,
              "server": f"uvicorn {uvicorn.__version__} + starlette {starlette.__version__} StaticFiles",
              "seconds": times, "median_s": med, "median_mb_s": {k: mb / v for k, v in med.items()},
              "cpu_s": cpu, "server_cpu_s": server_cpu,
              "pull_vs_curl": med["curl"] / med["pull"], "pull_transfer_vs_curl": med["curl"] / med["pull_transfer"],
              "pull_vs_curl_parallel": med["curl_parallel"] / med["pull"]}
    for k, v in med.items():
        spent = (f"  CPU {statistics.median(cpu[k]):.2f} s, server CPU {statistics.median(server_cpu[k]):.2f} s"
                 if k in cpu else "")
        print(f"{k:14s} median {v:.2f} s  {mb / v:.0f} MB/s{spent}")
    print(f"pull / curl speed: {record['pull_vs_curl']:.2f} launch to exit, {record['pull_transfer_vs_curl']:.2f} "
          f"transfer only; against curl --parallel {record['pull_vs_curl_parallel']:.2f}")
    print(f"saved {save_results('pull_speed', [record], args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
