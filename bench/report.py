"""What a serving run leaves behind: bench_serving's console table (so figures can be read side by
side with SGLang's and vLLM's), one JSONL record per run (every percentile of every latency, which
the table shortens to bench_serving's choice), and optional PNG charts."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from llama_aot.bench.serving import Metrics, RequestResult

WIDTH = 50


def _row(name: str, value) -> str:
    if isinstance(value, float):
        return "{:<40} {:<10.2f}".format(name, value)
    return "{:<40} {:<10}".format(name, value)


def _section(title: str, lines: list[tuple[str, float]]) -> list[str]:
    return ["{s:{c}^{n}}".format(s=title, n=WIDTH, c="-")] + [_row(name, value) for name, value in lines]


def format_table(m: Metrics, backend: str, request_rate: float, max_concurrency: int | None) -> str:
    """bench_serving's table, line for line (SGLang 0.5.x: a 50-wide '=' header, "{:<40} {:<10}"
    rows, '-' section rules, the same rows in the same order) wherever we measure the figure: the
    retokenized count needs a tokenizer, and "Total input vision tokens" (we send no images) is
    left out. Then our failures, each with its reason, so a bad run explains itself."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=WIDTH, c="="),
             _row("Backend:", backend),
             _row("Traffic request rate:", str(float(request_rate))),  # as bench_serving: inf, 20.0
             _row("Max request concurrency:", max_concurrency if max_concurrency else "not set"),
             _row("Successful requests:", m.completed),
             _row("Benchmark duration (s):", m.duration_s),
             _row("Total input tokens:", m.total_input),
             _row("Total input text tokens:", m.total_input),
             _row("Total generated tokens:", m.total_output)]
    if m.total_output_retokenized is not None:
        lines.append(_row("Total generated tokens (retokenized):", m.total_output_retokenized))
    lines += [_row("Request throughput (req/s):", m.request_throughput),
              _row("Input token throughput (tok/s):", m.input_throughput),
              _row("Output token throughput (tok/s):", m.output_throughput),
              _row("Peak output token throughput (tok/s):", m.peak_output_throughput),
              _row("Peak concurrent requests:", m.peak_concurrency),
              _row("Total token throughput (tok/s):", m.total_throughput),
              _row("Concurrency:", m.concurrency)]
    if m.accept_length is not None:
        lines.append(_row("Accept length:", m.accept_length))
    lines += _section("End-to-End Latency", [("Mean E2E Latency (ms):", m.e2e.mean),
                                             ("Median E2E Latency (ms):", m.e2e.median)])
    lines += _section("Time to First Token", [("Mean TTFT (ms):", m.ttft.mean), ("Median TTFT (ms):", m.ttft.median),
                                              ("P99 TTFT (ms):", m.ttft.p99)])
    lines += _section("Time per Output Token (excl. 1st token)", [
        ("Mean TPOT (ms):", m.tpot.mean), ("Median TPOT (ms):", m.tpot.median), ("P99 TPOT (ms):", m.tpot.p99)])
    lines += _section("Inter-Token Latency", [("Mean ITL (ms):", m.itl.mean), ("Median ITL (ms):", m.itl.median),
                                              ("P95 ITL (ms):", m.itl.p95), ("P99 ITL (ms):", m.itl.p99),
                                              ("Max ITL (ms):", m.itl.max)])
    if m.failures:
        lines.append("{s:{c}^{n}}".format(s=f"Failed requests: {m.failed}", n=WIDTH, c="-"))
        lines += [f"{count:>6} x {reason}" for reason, count in sorted(m.failures.items(), key=lambda kv: -kv[1])]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def metrics_record(m: Metrics) -> dict:
    """The metrics as plain JSON values (infinities would not be valid JSON)."""
    return json.loads(json.dumps(asdict(m)))


def append_jsonl(path: Path, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(results: list[RequestResult], path: Path, title: str) -> Path:
    """One panel per latency (TTFT, TPOT, ITL, E2E): the fraction of requests at or under each time."""
    plt = _pyplot()
    ok = [r for r in results if r.success]
    series = {"TTFT": [r.ttft for r in ok],
              "TPOT": [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1],
              "ITL": [g for r in ok for g in r.itl], "E2E": [r.latency for r in ok]}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, (name, values) in zip(axes, series.items()):
        values = sorted(v * 1000 for v in values)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_throughput_vs_concurrency(points: dict[str, list[tuple[float, float]]], path: Path) -> Path:
    """Output token throughput against measured concurrency, one line per scenario of a sweep."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, xy in points.items():
        xy = sorted(xy)
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=label)
    ax.set_xlabel("concurrency (mean requests in flight)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
