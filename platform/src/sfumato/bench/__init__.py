"""Benchmarks: each runs the project and a baseline on the same machine in one run."""

import json
from pathlib import Path


def publish(result: dict, text: str, out: str | None) -> dict:
    """Print a bench's table and, with --out, write its figures as JSON."""
    print(text)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result
