"""Benchmark results as JSON in bench/results/, each record carrying the git sha and the device."""
from __future__ import annotations

import json
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def save_results(kind: str, records: list[dict], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    device = records[0]["device"].replace(" ", "-") if records else "unknown"
    path = out_dir / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{device}.json"
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path
