"""Host memory of a build against the weights it writes: does a `--tp N` build hold one shard?

    python -m llama_aot.bench.build_memory [--layers 4] [--tp 4] [--work DIR] [--out-dir bench/results]

Writes a random checkpoint with Llama-3.1-8B's dimensions cut to --layers (bench/random_checkpoint.py),
runs `llama-compile --target cpu --tp N` on it as a child process, and samples every process of the
build every SAMPLE_S from /proc: the build process's resident memory, anonymous (what it allocated)
and file-backed (checkpoint pages it touched; these count in RSS until dropped), and the sum over
the whole tree, which includes the verification's rank processes (each holds its own rank's weights:
on a GPU those live in device memory, on the CPU target in host memory). Peaks are reported against
the checkpoint's bytes and each rank's weights file, and saved as JSON with the git sha.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llama_aot.artifacts.manifest import read_manifest
from llama_aot.bench.random_checkpoint import write_random_checkpoint
from llama_aot.bench.results import save_results
from llama_aot.compiler.package import git_sha

SAMPLE_S = 0.05
STATUS_FIELDS = ("RssAnon", "RssFile", "RssShmem")


def _status_kib(pid: int) -> dict[str, int]:
    """The STATUS_FIELDS of /proc/PID/status in KiB; empty once the process has gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            out[key] = int(value.split()[0])
    return out


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc/*/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").is_dir() else ():
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found


def measure_build(command: list[str], log: Path) -> dict:
    """Runs `command`, sampling memory until it exits; its output goes to `log`."""
    peak_build = {"rss": 0, **{f: 0 for f in STATUS_FIELDS}}
    peak_tree = peak_processes = 0
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            own = _status_kib(proc.pid)
            if own:
                rss = sum(own.values())
                if rss > peak_build["rss"]:
                    peak_build = {"rss": rss, **own}
            tree = [_status_kib(p) for p in _descendants(proc.pid)]
            peak_tree = max(peak_tree, sum(sum(s.values()) for s in tree))
            peak_processes = max(peak_processes, sum(1 for s in tree if s))
            time.sleep(SAMPLE_S)
    gib = lambda kib: kib / 2**20  # noqa: E731
    return {"exit_status": proc.returncode, "wall_s": time.perf_counter() - start,
            "build_process_peak_gib": gib(peak_build["rss"]),
            "build_process_at_peak_gib": {k: gib(v) for k, v in peak_build.items() if k != "rss"},
            "tree_peak_gib": gib(peak_tree), "tree_peak_processes": peak_processes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--work", type=Path, default=Path("/tmp/llama-aot-build-memory"))
    p.add_argument("--out-dir", type=Path, help="where the JSON goes (default: bench/results)")
    args = p.parse_args(argv)
    ckpt = args.work / f"llama-3.1-8b-{args.layers}layers-random"
    if not (ckpt / "config.json").is_file():
        print(f"writing {ckpt} ...", file=sys.stderr, flush=True)
        write_random_checkpoint(ckpt, args.layers, device="cpu")
    weight_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    command = [sys.executable, "-m", "llama_aot.compiler.cli", "--model", str(ckpt), "--target", "cpu",
               "--dtype", "bfloat16", "--tp", str(args.tp), "--no-cache", "-o", str(args.work / "artifact")]
    print(" ".join(command), file=sys.stderr, flush=True)
    result = measure_build(command, args.work / "build.log")
    if result["exit_status"] != 0:
        print(f"the build failed (exit {result['exit_status']}); see {args.work / 'build.log'}", file=sys.stderr)
        return 1
    weights_gib = weight_bytes / 2**30
    artifact = args.work / "artifact"
    rank_gib = [(artifact / w).stat().st_size / 2**30 for w in read_manifest(artifact).programs[0].weights]
    record = {"git_sha": git_sha(), "device": "cpu", "cpus": len(os.sched_getaffinity(0)), "layers": args.layers,
              "tp": args.tp, "checkpoint_gib": weights_gib, "rank_weights_gib": rank_gib, **result}
    print(f"checkpoint {weights_gib:.2f} GiB; each rank's weights {max(rank_gib):.2f} GiB (the embedding is "
          f"every rank's); "
          f"build process peak {result['build_process_peak_gib']:.2f} GiB "
          f"({', '.join(f'{k} {v:.2f}' for k, v in result['build_process_at_peak_gib'].items())}); "
          f"all {result['tree_peak_processes']} processes together at most {result['tree_peak_gib']:.2f} GiB; "
          f"{result['wall_s']:.0f} s")
    print(save_results(f"build-memory-tp{args.tp}", [record], args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
