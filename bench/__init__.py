"""Benchmarks and accuracy evaluation (llama-bench)."""
