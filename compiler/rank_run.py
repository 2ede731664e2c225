"""Running a tensor-parallel artifact's compiled program on all its ranks at build time, for
verification: one process per rank (each GPU on CUDA), joined over gloo or NCCL as serving joins
them, each with only its own weights and its own shard of the KV cache.

Every rank runs the whole schedule (the steps' inputs are the same on every rank, and the logits
are gathered to all of them), so no rank waits on another for its inputs; rank 0 hands its logits
back. The ranks rendezvous through a file in a temporary directory, which no other build can take
as a TCP port could be.
"""
from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.compiler.errors import BuildError
from llama_aot.compiler.verify import Schedule

# How long a rank waits for the others, to join or in a collective, before it fails rather than
# hangs. Each loads its weights before joining, so the wait is for the slowest load.
TIMEOUT_S = 600


def compiled_run_on_ranks(package: Path, weight_files: list[Path], schedule: Schedule, layout: KVCacheLayout,
                          device_type: str) -> list[torch.Tensor]:
    """Rank 0's logits over the schedule, with `weight_files[r]` on rank r."""
    world = len(weight_files)
    with tempfile.TemporaryDirectory(prefix="llama-aot-ranks-") as tmp:
        out, steps = Path(tmp) / "rank0-logits.pt", Path(tmp) / "schedule.pt"
        # Through a file: tensors among spawn's arguments travel as shared-memory handles that each
        # child fetches from this process, and that hand-over hung (both ranks waiting on a futex).
        torch.save(schedule, steps)
        init = f"file://{tmp}/rendezvous"
        context = mp.start_processes(_rank_main, args=(world, device_type, init, package, weight_files, steps,
                                                       layout, out), nprocs=world, join=False, start_method="spawn")
        try:
            while not context.join():
                pass
        except mp.ProcessRaisedException as e:
            raise BuildError(f"verification on {world} ranks failed: rank {e.error_index} raised "
                             f"{_last_line(str(e))}; no artifact was written") from None
        except mp.ProcessExitedException as e:
            raise BuildError(f"verification on {world} ranks failed: rank {e.error_index} exited with "
                             f"{'signal ' + e.signal_name if e.signal_name else f'status {e.exit_code}'}; "
                             "no artifact was written") from None
        return torch.load(out)


def _rank_main(rank: int, world: int, device_type: str, init: str, package: Path, weight_files: list[Path],
               steps: Path, layout: KVCacheLayout, out: Path) -> None:
    import torch.distributed as dist

    import llama_aot.kernels.ops  # noqa: F401  (the program calls torch.ops.llama_aot)
    from llama_aot.artifacts.program import attach_weights, load_package
    from llama_aot.artifacts.tensor_parallel import join_group
    from llama_aot.artifacts.weights_file import read_weights
    from llama_aot.compiler.verify import compiled_run

    device = device_type
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    else:
        from llama_aot.kernels import cpu_kernels

        cpu_kernels.available()  # the program calls the C++ attention through the dispatcher, if it was built
    schedule = torch.load(steps, weights_only=False)
    program = load_package(package)
    weights = read_weights(weight_files[rank], device)
    attach_weights(program, weights, weight_files[rank])
    join_group(rank, world, device_type, init, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        rows = compiled_run(program, schedule, layout, device)
        if rank == 0:
            torch.save(rows, out)
    finally:
        dist.destroy_process_group()


def _last_line(message: str) -> str:
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "an error"

