"""The serving runtime: artifact loading, step inputs, and (with llama-serve) the engine loop."""
