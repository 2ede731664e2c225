"""Processes of a tensor-parallel server, seen through /proc (Linux, as PR_SET_PDEATHSIG is): its
descendants, taken while it lives (an orphan is re-parented, so it cannot be found from the server
later), and whether they are still running. A zombie counts as gone: it runs nothing and holds no
GPU, and in a container whose init does not reap, orphans stay zombies forever."""
import time
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if (fields := _stat(pid)) is not None and fields[0] not in "ZX"]


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still running after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while running(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running(pids)


def worker_pids(server_pid: int, timeout: float = 10.0) -> dict[int, int]:
    """{rank: pid} of a live server's worker ranks, which name themselves llama-rank{r}."""
    deadline = time.monotonic() + timeout
    while True:
        ranks = {}
        for pid in descendants(server_pid):
            try:
                name = process_name(pid)
            except OSError:
                continue
            if name.startswith("llama-rank"):
                ranks[int(name.removeprefix("llama-rank"))] = pid
        if ranks or time.monotonic() > deadline:
            return ranks
        time.sleep(0.05)
