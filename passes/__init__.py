"""Graph passes over the exported program, one per file, run by the ordered pipeline in pipeline.py."""
