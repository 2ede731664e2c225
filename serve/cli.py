"""`llama-serve ARTIFACT`: load a compiled artifact and serve the OpenAI API over HTTP.

ARTIFACT may also be a store REF (an http(s) URL, hf://ORG/REPO, a store directory; see
llama-artifacts): the build that fits this machine is pulled into the cache first (artifacts/pull.py).

Flags follow SGLang's names where it has them. Start-up problems (a refused artifact, a bad flag,
a busy port, a rank that fails to start) are one line on stderr and exit status 2. SIGTERM and
Ctrl-C stop accepting new connections, let requests in flight finish (up to --graceful-timeout
seconds), then stop the engine and the other ranks.

An artifact built for N ranks (llama-compile --tp N) is served by N processes: this one is rank 0
(HTTP, scheduler, its shard) and starts the others (runtime/worker_group.py). A rank that dies
while serving stops the server (RankFailures), with exit status 1.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from llama_aot.artifacts.errors import ArtifactError, CLIParser, ConfigError
from llama_aot.artifacts.manifest import Manifest, checked_manifest
from llama_aot.runtime.config import RuntimeConfig, RuntimeConfigError

RANK_FAILURE_EXIT_S = 5.0  # how long a server whose rank died lets its requests get their errors


def parse_args(argv):
    p = CLIParser(prog="llama-serve", description=__doc__.splitlines()[0])
    p.add_argument("artifact", help="artifact directory built by llama-compile, or a store REF to pull it from "
                                    "(http(s)://..., hf://ORG/REPO, a store directory; see llama-artifacts)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/*")
    p.add_argument("--served-model-name", help="model id clients send (default: the artifact's directory name)")
    p.add_argument("--context-length", type=int, default=0, help="longest request (default: the artifact's)")
    p.add_argument("--max-running-requests", type=int, default=0, help="sequences per step (default: the artifact's)")
    p.add_argument("--chunked-prefill-size", type=int, default=0, help="token budget per step (default: the artifact's)")
    p.add_argument("--mem-fraction-static", type=float,
                   help="fraction of device memory for weights and KV cache; on a GPU, memory other processes "
                        "hold counts against it (default: 0.85 on GPU, 0.1 of RAM on CPU)")
    p.add_argument("--kv-cache-blocks", type=int, default=0, help="KV cache size in blocks (overrides --mem-fraction-static)")
    p.add_argument("--disable-prefix-caching", action="store_true")
    p.add_argument("--disable-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA")
    p.add_argument("--cuda-graph-max-bs", type=int, default=0,
                   help="largest decode batch captured as a CUDA graph (default: --max-running-requests, at most 160)")
    p.add_argument("--speculative-num-steps", type=int, metavar="K",
                   help="tokens an EAGLE artifact drafts per step, 0 to serve it without speculation (default: "
                        "the artifact's --speculative-num-steps)")
    p.add_argument("--tool-call-parser", choices=("llama3",), help="parse tool calls in this format")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds to let requests finish on SIGTERM")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p.parse_args(argv)


def _seconds_since_launch() -> float | None:
    """How long this process has existed, from /proc (Linux only, to 10 ms): the start-up line
    reports it beside the load's own stages, since interpreter start and imports are part of what
    a user waits for and nothing inside the process can time them."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None


def _check_gpus(path: Path, manifest: Manifest) -> None:
    """A CUDA artifact built for N ranks needs N visible GPUs, one per rank."""
    if manifest.device_type != "cuda" or manifest.world_size == 1:
        return
    import torch

    ranks, visible = manifest.world_size, torch.cuda.device_count()
    if visible < ranks:
        raise RuntimeConfigError(f"{path} was built for {ranks} GPUs (--tp {ranks}) but {visible} are visible; "
                                 f"serve it on a machine with {ranks} GPUs (see CUDA_VISIBLE_DEVICES), or rebuild "
                                 f"it with a --tp this machine has")


class RankFailures:
    """What a failed rank does to the server, called once from the worker monitor's thread.

    During start-up rank 0 may be blocked where no exception reaches it (joining a group a worker
    never joins), so the process prints the one error line and exits with status 2 at once; the
    other workers die with it (runtime/tp_worker.py). Once serving, the engine fails the requests
    in flight (their next step raises RankFailure), uvicorn stops, and RANK_FAILURE_EXIT_S later
    the process exits regardless, in case rank 0 is stuck where a dead rank left it."""

    def __init__(self):
        self.server = None  # set once serving
        self.failed = False
        self._lock = threading.Lock()

    def report(self, message: str) -> bool:
        """Prints the error line unless one was printed already; says whether it printed."""
        with self._lock:
            if self.failed:
                return False
            self.failed = True
        print(f"llama-serve: error: {message}", file=sys.stderr, flush=True)
        return True

    def __call__(self, message: str) -> None:
        if not self.report(message):
            return
        if self.server is None:
            os._exit(2)
        self.server.should_exit = True
        deadline = threading.Timer(RANK_FAILURE_EXIT_S, os._exit, args=(1,))
        deadline.daemon = True
        deadline.start()


def _start_ranks(args, failures: RankFailures):
    """Checks that this machine can run the artifact and, for one built for N ranks, starts ranks
    1..N-1, which load alongside rank 0; returns (whether decode runs as CUDA graphs, the workers
    or None)."""
    if not args.artifact.is_dir():  # load_artifact says why
        return False, None
    manifest, device = checked_manifest(args.artifact)
    capturable = device == "cuda" and not args.disable_cuda_graph
    _check_gpus(args.artifact, manifest)
    if manifest.world_size == 1:
        return capturable, None
    from llama_aot.runtime.worker_group import WorkerGroup

    return capturable, WorkerGroup.start(args.artifact, manifest.world_size, device, capturable, failures)


def build_server(args, failures: RankFailures | None = None):
    """Loads everything and returns (uvicorn server, engine); raises the user-facing errors.
    The engine is not running yet: `main` runs it on this thread (`_serve` says why), a test can
    `start()` it on a thread of its own. `failures` hears of a rank that fails, if the artifact
    has more than one."""
    from llama_aot.artifacts.pull import resolve_artifact
    from llama_aot.serve.app import ServeConfig

    args.artifact = resolve_artifact(args.artifact, say=lambda line: print(f"llama-serve: {line}", file=sys.stderr,
                                                                           flush=True))
    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key,
                         served_model_name=args.served_model_name or args.artifact.resolve().name,
                         tool_call_parser=args.tool_call_parser)
    runtime = RuntimeConfig(max_num_seqs=args.max_running_requests,
                            max_num_tokens=args.chunked_prefill_size, context_length=args.context_length,
                            mem_fraction_static=args.mem_fraction_static, kv_cache_blocks=args.kv_cache_blocks,
                            enable_prefix_caching=not args.disable_prefix_caching,
                            disable_cuda_graph=args.disable_cuda_graph, cuda_graph_max_bs=args.cuda_graph_max_bs,
                            speculative_num_steps=args.speculative_num_steps)
    _check_port(config.host, config.port)
    start = time.perf_counter()
    capturable, workers = _start_ranks(args, failures or RankFailures())
    with contextlib.ExitStack() as on_error:
        if workers is not None:
            on_error.callback(workers.close)
        server, engine = _load_and_serve(args, config, runtime, capturable, workers, start)
        on_error.pop_all()  # the server stops the workers from now on
    return server, engine


def _load_and_serve(args, config, runtime: RuntimeConfig, capturable: bool, workers, start: float):
    import uvicorn
    from tokenizers import Tokenizer

    from llama_aot.runtime.artifact import load_artifact
    from llama_aot.runtime.engine import Engine
    from llama_aot.runtime.model_runner import ModelRunner
    from llama_aot.runtime.tensor_parallel import TensorParallelRunner
    from llama_aot.serve.app import create_app
    from llama_aot.serve.chat_template import load_chat_template

    artifact = load_artifact(args.artifact, single_threaded=capturable)
    template = load_chat_template(args.artifact)
    tokenizer = template.tokenizer if template else Tokenizer.from_file(str(args.artifact / "tokenizer.json"))
    resolved = runtime.resolve(artifact.model_config, artifact.build_config, artifact.weight_bytes)
    engine_start = time.perf_counter()
    runner = TensorParallelRunner(artifact, resolved, workers) if workers else ModelRunner(artifact, resolved)
    engine = Engine(runner, tokenizer)
    engine_s = time.perf_counter() - engine_start
    warmup = runner.warmup()
    # The grammar compiler reads the vocabulary once (~1.7 s for Llama 3's): before the first
    # structured-output request, not during it.
    threading.Thread(target=engine.structured.warm_up, name="grammar-warm-up", daemon=True).start()
    graphs = warmup.graph_batch_sizes
    captured = (f", captured {warmup.graph_count} CUDA graphs (batch {graphs[0]}-{graphs[-1]}) in "
                f"{warmup.capture_s:.1f} s" if graphs else "")
    stages = ", ".join(f"{name} {s:.1f} s" for name, s in {**artifact.load_seconds, "engine": engine_s}.items())
    steps = resolved.speculative_num_steps
    drafting = f"; EAGLE drafting {steps} token{'s' * (steps > 1)} a step" if steps else ""
    age = _seconds_since_launch()
    loaded = f"loaded {args.artifact} in {time.perf_counter() - start:.1f} s"
    loaded += f", ready {age:.1f} s after launch" if age is not None else ""
    print(f"llama-serve: {loaded} ({stages}, first step "
          f"{warmup.first_step_s * 1e3:.0f} ms{captured}); KV cache {resolved.num_blocks} blocks x "
          f"{resolved.block_size} tokens in {artifact.build_config.kv_dtype} "
          f"({resolved.num_blocks * resolved.block_bytes / 2**30:.2f} GiB){drafting}; serving "
          f"'{config.served_model_name}' on http://{config.host}:{config.port}", file=sys.stderr, flush=True)
    if workers is not None:
        handover = ", ".join(f"{s * 1e6:.0f} us ({name})" for name, s in runner.handover_s.items())
        print(f"llama-serve: {artifact.manifest.world_size} ranks; handing a step's plan to the other ranks takes "
              f"{handover}", file=sys.stderr, flush=True)

    app = create_app(engine, template, config)

    class Server(uvicorn.Server):
        """Stops the engine once uvicorn has drained its connections (`_serve` then re-raises the
        signal, so a SIGTERM'd server exits as terminated by SIGTERM, as supervisors expect)."""

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets)
            engine.shutdown()
            if workers is not None:
                workers.close()

    server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=args.graceful_timeout))
    return server, engine


def _log_to_stderr(level: str) -> None:
    """The engine's progress lines (runtime/engine.py) on stderr, at --log-level."""
    logger = logging.getLogger("llama_aot")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("llama-serve: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
    _log_to_stderr(args.log_level)
    from llama_aot.runtime.worker_group import RankFailure

    failures = RankFailures()
    try:
        server, engine = build_server(args, failures)
    except (ArtifactError, ConfigError, ValueError, RankFailure) as e:
        failures.report(str(e))
        return 2
    failures.server = server
    return _serve(server, engine) or (1 if failures.failed else 0)


def _serve(server, engine) -> int | None:
    """Runs the engine loop on this, the main, thread and uvicorn on another; returns uvicorn's
    exit status if it could not start.

    Why this way round: on the CPU every op of a step is an OpenMP parallel region, and libgomp
    throttles the spinning of its idle threads to almost nothing once it manages more threads
    than there are cores. A second thread that runs regions (the engine's, beside the main
    thread's pool from loading and warm-up) crosses that line on a 2-core machine, and every
    region then pays a futex wake-up: the int8 default's step ran 11.6 ms on the main thread and
    27 ms on another (docs/cpu.md). uvicorn only listens for signals on the main thread, so this
    thread takes SIGINT and SIGTERM for it and, once it has drained, re-raises them, so that a
    SIGTERM'd server still exits as terminated by SIGTERM."""
    import signal

    startup_failure: list[int] = []

    def serve_http() -> None:
        try:
            server.run()
        except SystemExit as e:  # uvicorn's start-up failure
            startup_failure.append(e.code)
        finally:
            engine.shutdown()  # also when uvicorn stopped on its own

    captured: list[int] = []

    def on_signal(sig, frame) -> None:
        captured.append(sig)
        server.handle_exit(sig, frame)

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    http = threading.Thread(target=serve_http, name="http")
    http.start()
    try:
        engine.run()
    finally:
        server.should_exit = True  # the engine stopped first only if it failed
        http.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for sig in reversed(captured):
        signal.raise_signal(sig)
    return startup_failure[0] if startup_failure else None


if __name__ == "__main__":
    sys.exit(main())
