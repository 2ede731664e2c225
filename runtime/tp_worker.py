"""A worker rank of a tensor-parallel server: one process per rank above 0, started by rank 0
(runtime/worker_group.py) with the multiprocessing "spawn" context.

It loads its rank of the artifact (while rank 0 loads its own), joins the ranks' process group,
builds its model runner with the runtime config rank 0 resolved and sent (every rank's KV cache
must have the same blocks, since block ids travel in the plans), warms up as rank 0 does (the same
CUDA graphs, whose collectives pair up), then runs every plan rank 0 sends, in order, and drops
its logits.

It never outlives rank 0: the kernel kills it when its parent dies (PR_SET_PDEATHSIG), even by
SIGKILL, and it leaves when its plan pipe closes. ps and top show it as `llama-rank{r}`. Ctrl-C
reaches the whole process group; workers ignore it and let rank 0 stop them in order. An error is
sent to rank 0 as one line before the process exits with status 1, so the server can name the
rank and the error; a user's error (a refused artifact, a cache the device cannot hold) is only
that line, anything else also leaves its traceback on stderr.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist

from llama_aot.artifacts.errors import ArtifactError, ConfigError
from llama_aot.artifacts.tensor_parallel import join_group
from llama_aot.runtime.artifact import load_artifact
from llama_aot.runtime.model_runner import ModelRunner
from llama_aot.runtime.step_channel import PLAN, PROBE, STOP, PlanReceiver

PR_SET_NAME, PR_SET_PDEATHSIG = 15, 1


def prepare_device(rank: int, world_size: int, device_type: str) -> None:
    """Rank r computes on GPU r; on CPU the ranks share the cores evenly, since N processes each
    running a thread per core would oversubscribe the machine N times over."""
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))


def worker_main(rank: int, world_size: int, device_type: str, init_method: str, path: Path,
                single_threaded: bool, parent_pid: int, plans: Connection, status: Connection) -> None:
    _bind_to_parent(rank, parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        prepare_device(rank, world_size, device_type)
        artifact = load_artifact(path, rank=rank, single_threaded=single_threaded)
        join_group(rank, world_size, device_type, init_method)  # the programs resolve the group when they run
        runner = ModelRunner(artifact, plans.recv())  # the ResolvedRuntime, once rank 0 has resolved it
        status.send(("prepared", None))  # no collective runs before every rank got this far
        runner.warmup()
        status.send(("ready", None))
        _serve(runner, PlanReceiver(plans), status)
    except EOFError:  # rank 0 has gone; nobody is left to tell
        sys.exit(1)
    except BaseException as e:  # noqa: BLE001  (any error ends the rank; rank 0 names it)
        user_error = isinstance(e, (ArtifactError, ConfigError))
        if not user_error:
            traceback.print_exc()
        try:
            status.send(("error", str(e) if user_error else f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        sys.exit(1)
    dist.destroy_process_group()


def _serve(runner: ModelRunner, receiver: PlanReceiver, status: Connection) -> None:
    while True:
        kind, plan = receiver.receive()
        if kind == PLAN:
            runner.execute(plan)
        elif kind == PROBE:
            status.send(("probe", time.perf_counter()))
        elif kind == STOP:
            return


def _bind_to_parent(rank: int, parent_pid: int) -> None:
    """Names the process `llama-rank{rank}` (as ps and top show it) and asks the kernel to SIGKILL
    it when rank 0 dies; exits if rank 0 already has."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, f"llama-rank{rank}".encode())
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
