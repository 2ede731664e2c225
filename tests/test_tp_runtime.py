"""Serving a --tp 2 artifact: two ranks over gloo on CPU, rank 0 the server.

The plan hand-over alone; the runner in this process against the one-rank artifact's logits; then
`llama-serve` as users run it: greedy tokens equal to the --tp 1 server's through the stock openai
client, and the faults (a worker killed mid-request, the server killed, a rank that cannot load,
SIGTERM), after each of which no process of the server may be left running."""
import dataclasses
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pipe

import httpx
import openai
import pytest
import torch

from llama_aot.artifacts.manifest import read_manifest
from llama_aot.artifacts.step_abi import SequenceChunk
from llama_aot.runtime.artifact import load_artifact
from llama_aot.runtime.config import RuntimeConfig
from llama_aot.runtime.model_runner import ModelRunner, StepPlan
from llama_aot.runtime.step_channel import PLAN, PROBE, STOP, PlanReceiver, PlanSender
from llama_aot.runtime.tensor_parallel import TensorParallelRunner
from llama_aot.runtime.worker_group import WorkerGroup

from server import ServerProcess
from tp_fixtures import descendants, wait_gone, worker_pids

MODEL = "served"
PROMPTS = ["The capital of France is", "1, 2, 3,", "Once upon a time", "def main():", "Hello, world",
           "The quick brown fox", "A B C D E", "Tensor parallel"]


@pytest.fixture(scope="module")
def tp_artifact(tiny_tp2_artifact):
    """The artifact every test here serves: the tiny model built with --tp 2."""
    assert read_manifest(tiny_tp2_artifact).world_size == 2
    return tiny_tp2_artifact


# ---- the hand-over ---------------------------------------------------------------------------

class Recorder:
    """A pipe end that keeps what is sent, to see the encoded sizes."""

    def __init__(self, conn):
        self.conn, self.sizes = conn, []

    def send_bytes(self, data):
        self.sizes.append(len(data))
        self.conn.send_bytes(data)


def decode_step(tables, position, token=7):
    return StepPlan(tuple(SequenceChunk((token + i,), position, tuple(t)) for i, t in enumerate(tables)),
                    tuple(range(len(tables))))


def test_the_channel_hands_over_every_plan_as_sent():
    """Rows keep, grow, swap, shrink and share prefixes from one plan to the next; a decode
    step whose tables only grew sends its new blocks, not the tables."""
    reader, writer = Pipe(duplex=False)
    recorder = Recorder(writer)
    sender, receiver = PlanSender([recorder]), PlanReceiver(reader)
    tables = [list(range(1 + 100 * i, 41 + 100 * i)) for i in range(64)]
    prefill = StepPlan((SequenceChunk(tuple(range(50)), 0, (1, 2, 3), all_logits=True),
                        SequenceChunk((5, 6), 10, (9, 8, 7))), (0, 51))
    plans = [prefill, decode_step(tables, 159)]
    tables[3].append(999)
    plans.append(decode_step(tables, 160))
    plans.append(decode_step(tables[::-1], 160))  # every row now holds another sequence
    plans.append(decode_step([tables[5][:2], tables[5][:3]], 9))  # shorter tables, a shared prefix
    plans.append(decode_step(tables[:1], 160))
    for kind, plan in zip([PLAN, PROBE] + [PLAN] * (len(plans) - 2), plans):
        sender.send(plan, kind)
        assert receiver.receive() == (kind, plan)
    assert recorder.sizes[2] < recorder.sizes[1] / 5  # 64 rows of a token and at most one new block
    sender.stop()
    assert receiver.receive() == (STOP, None)


# ---- the runner, in this process -------------------------------------------------------------

@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_runner_computes_the_one_rank_logits(tp_artifact, tiny_artifact, restore_threads):
    """Both ranks run each plan; rank 0 returns the logits of the whole model."""
    failures = []
    workers = WorkerGroup.start(tp_artifact, 2, "cpu", False, failures.append)
    try:
        runtime = RuntimeConfig(kv_cache_blocks=128)
        artifact = load_artifact(tp_artifact)
        runner = TensorParallelRunner(artifact, runtime.resolve(artifact.model_config, artifact.build_config,
                                                                artifact.weight_bytes), workers)
        runner.warmup()
        one = load_artifact(tiny_artifact)
        reference = ModelRunner(one, runtime.resolve(one.model_config, one.build_config, one.weight_bytes))
        prompts = [(5, 9, 200, 31, 7), (64, 3), (11, 12, 13, 14, 15, 16, 17, 18, 19)]
        tables = [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12)]
        plans = [StepPlan(tuple(SequenceChunk(p, 0, t) for p, t in zip(prompts, tables)))]
        plans += [StepPlan(tuple(SequenceChunk((40 + step + i,), len(p) + step, t)
                                 for i, (p, t) in enumerate(zip(prompts, tables))), (0, 1, 2)) for step in range(4)]
        for plan in plans:
            logits, expected = runner.execute(plan), reference.execute(plan)
            assert torch.equal(logits.argmax(-1), expected.argmax(-1))
            assert ((logits - expected).norm() / expected.norm()).item() < 1e-5
        assert set(runner.handover_s) == {"1-sequence decode", "8-sequence decode", "64-token prefill"}
        assert all(0 < s < 0.1 for s in runner.handover_s.values())
    finally:
        workers.close()
    assert failures == []


# ---- llama-serve -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp_server(tp_artifact):
    proc = ServerProcess(tp_artifact, "--served-model-name", MODEL)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def one_rank_server(tiny_artifact):
    proc = ServerProcess(tiny_artifact, "--served-model-name", MODEL)
    yield proc
    proc.stop()


def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def completion(server, prompt):
    r = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, logprobs=1,
                                          extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    return lp.tokens, lp.token_logprobs


def test_greedy_tokens_equal_the_one_rank_servers(tp_server, one_rank_server):
    """Eight concurrent requests, batched together on both servers; then a chat."""
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        ranks2 = list(pool.map(lambda p: completion(tp_server, p), PROMPTS))
        ranks1 = list(pool.map(lambda p: completion(one_rank_server, p), PROMPTS))
    for (tokens, logprobs), (expected_tokens, expected_logprobs) in zip(ranks2, ranks1):
        assert tokens == expected_tokens
        assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)
    chat = [client(s).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi there"}],
                                              max_tokens=12, temperature=0) for s in (tp_server, one_rank_server)]
    assert chat[0].choices[0].message.content == chat[1].choices[0].message.content


def first_chunks_then(server, action, chunks=3):
    """Streams a long completion; after its first `chunks` events runs `action`, then reads the
    rest. Returns the events after the action."""
    body = {"model": MODEL, "prompt": "Count", "max_tokens": 200, "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=30) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        for _ in range(chunks):
            next(lines)
        action()
        try:
            events += lines
        except httpx.HTTPError as e:  # the server went away mid-stream: an error too, not a hang
            events.append(f"connection error: {e}")
    return events


def test_a_killed_worker_fails_requests_in_flight_and_stops_the_server(tp_artifact):
    server = ServerProcess(tp_artifact, "--served-model-name", MODEL)
    try:
        everything = descendants(server.proc.pid)
        rank1 = worker_pids(server.proc.pid)[1]
        killed_at = []

        def kill_rank1():
            killed_at.append(time.monotonic())
            os.kill(rank1, signal.SIGKILL)

        events = first_chunks_then(server, kill_rank1)
        assert events and "rank 1 exited with signal 9" in events[-1], events[-3:]
        assert server.proc.wait(15) == 1
        assert time.monotonic() - killed_at[0] < 10
        output = server.proc.stdout.read()
        assert "llama-serve: error: rank 1 exited with signal 9 (SIGKILL)" in output, output
        assert "llama-serve: 2 ranks; handing a step's plan to the other ranks takes" in output
        assert wait_gone(everything, 5) == []
    finally:
        server.stop(signal.SIGKILL)


def test_a_killed_server_takes_its_workers_with_it(tp_artifact):
    server = ServerProcess(tp_artifact)
    everything = descendants(server.proc.pid)
    assert worker_pids(server.proc.pid)
    server.stop(signal.SIGKILL)
    assert wait_gone(everything, 5) == []


def test_a_rank_that_cannot_load_is_one_line_and_exit_status_2(tp_artifact, tmp_path):
    artifact = tmp_path / "damaged"
    shutil.copytree(tp_artifact, artifact)
    weights = artifact / read_manifest(artifact).programs[0].weights[1]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="llama-serve exited with 2") as e:
        ServerProcess(artifact)
    output = str(e.value).split(": ", 1)[1].strip()
    assert output.startswith("llama-serve: error: rank 1 failed: ") and weights.name in output, output
    assert len(output.splitlines()) == 1, output


def test_too_few_gpus_are_refused_before_anything_loads(tp_artifact, monkeypatch, capsys):
    """On a machine with one GPU, a CUDA artifact built for two: one line, exit status 2, and
    neither a worker started nor a weight loaded."""
    import llama_aot.runtime.artifact
    from llama_aot.bench.server_process import free_port

    from llama_aot.serve import cli

    manifest = read_manifest(tp_artifact)
    cuda = dataclasses.replace(manifest, target={**manifest.target, "device_type": "cuda"})
    monkeypatch.setattr(cli, "checked_manifest", lambda path: (cuda, "cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for module, name in ((WorkerGroup, "start"), (llama_aot.runtime.artifact, "load_artifact")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("started loading"))
    assert cli.main([str(tp_artifact), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"llama-serve: error: {tp_artifact} was built for 2 GPUs (--tp 2) but 1 are visible; serve "
                   "it on a machine with 2 GPUs (see CUDA_VISIBLE_DEVICES), or rebuild it with a --tp this "
                   "machine has")


def test_a_tp2_fp8_artifact_serves_the_one_rank_fp8_artifacts_tokens(tiny_tp2_fp8_artifact, tiny_checkpoint,
                                                                      tiny_build, tmp_path):
    """--tp 2 --fp8 --kv-cache-dtype fp8_e4m3 through the stock client, against --tp 1 with the same
    quantization: each rank holds its rows' weights and scales, and each its KV heads in e4m3."""
    from llama_aot.compiler.build import build_artifact

    one_rank = tmp_path / "tp1"
    build_artifact(tiny_checkpoint, dataclasses.replace(tiny_build, weight_quant="fp8", kv_dtype="fp8_e4m3",
                                                        passes=None), one_rank)
    servers = []
    try:
        for artifact in (tiny_tp2_fp8_artifact, one_rank):
            servers.append(ServerProcess(artifact, "--served-model-name", MODEL))
        ranks2, ranks1 = ([completion(s, p)[0] for p in PROMPTS[:3]] for s in servers)
        assert ranks2 == ranks1 and all(len(tokens) == 16 for tokens in ranks2)
    finally:
        for server in servers:
            server.stop()


def test_sigterm_stops_every_rank(tp_server):
    """Last in the module: it stops the module's server."""
    everything = descendants(tp_server.proc.pid)
    assert worker_pids(tp_server.proc.pid)
    assert tp_server.stop(signal.SIGTERM) == -signal.SIGTERM
    assert wait_gone(everything, 5) == []
