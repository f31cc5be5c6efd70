"""The blind A/B test's votes: an append-only log, its preferences table and its results.

votes.jsonl holds one JSON line per vote, appended with O_APPEND and fsynced before the page is
told the vote counts, so a killed server loses at most the vote in flight. A line cut off by the
kill is never read as a vote: `read_votes` skips and counts every line that is not a whole vote,
and opening the log again first ends such a line, so the next vote starts on a line of its own.

Results (`results`) give each model's win rate (a tie counts half, skips not at all) with a 95%
Wilson interval, overall and per condition, and how many votes remain for the planned sample size.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

CHOICES = ("left", "right", "tie", "skip")
FIELDS = (
    "vote",
    "time",
    "rater",
    "trial",
    "condition",
    "seed_left",
    "seed_right",
    "left_model",
    "right_model",
    "left_image",
    "right_image",
    "choice",
    "winner",
)


class VoteLog:
    """votes.jsonl of one A/B test folder; safe for the threads of one server process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                cut_off = fh.read(1) != b"\n"
            if cut_off:  # a kill mid-write: end that line, so it stays one bad line, counted and skipped
                self._write(b"\n")

    def _write(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, vote: dict) -> None:
        """One vote, on disk (fsynced) when this returns."""
        missing = [k for k in FIELDS if k not in vote]
        if missing:
            raise ValueError(f"a vote needs {missing}")
        if vote["choice"] not in CHOICES:
            raise ValueError(f"choice {vote['choice']!r} is not one of {CHOICES}")
        line = json.dumps({k: vote[k] for k in FIELDS}, ensure_ascii=True, sort_keys=True) + "\n"
        with self._lock:
            self._write(line.encode())

    def read(self) -> tuple[list[dict], int]:
        return read_votes(self.path)


def read_votes(path: Path) -> tuple[list[dict], int]:
    """(the whole votes, the number of damaged lines skipped) of a votes.jsonl."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    votes, damaged = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            vote = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            damaged += 1
            continue
        if not isinstance(vote, dict) or any(k not in vote for k in FIELDS) or vote["choice"] not in CHOICES:
            damaged += 1
            continue
        votes.append(vote)
    return votes, damaged


def winner(choice: str, left_model: str, right_model: str) -> str | None:
    return {"left": left_model, "right": right_model}.get(choice)


def votes_table(votes: list[dict]):
    """The preferences table (pyarrow), one row per vote, columns FIELDS."""
    import pyarrow as pa

    schema = pa.schema(
        [
            ("vote", pa.string()),
            ("time", pa.float64()),
            ("rater", pa.string()),
            ("trial", pa.string()),
            ("condition", pa.string()),
            ("seed_left", pa.int64()),
            ("seed_right", pa.int64()),
            ("left_model", pa.string()),
            ("right_model", pa.string()),
            ("left_image", pa.string()),
            ("right_image", pa.string()),
            ("choice", pa.string()),
            ("winner", pa.string()),
        ]
    )
    return pa.Table.from_pylist([{k: v[k] for k in FIELDS} for v in votes], schema=schema)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% at z = 1.96); (0, 1) with no trials."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _tally(votes: list[dict], models: list[str]) -> dict:
    counted = [v for v in votes if v["choice"] != "skip"]
    out = {"votes": len(counted), "ties": sum(v["choice"] == "tie" for v in counted), "models": {}}
    for model in models:
        mine = [v for v in counted if model in (v["left_model"], v["right_model"])]
        wins = sum(v["winner"] == model for v in mine)
        ties = sum(v["choice"] == "tie" for v in mine)
        score = wins + 0.5 * ties
        low, high = wilson_interval(score, len(mine))
        out["models"][model] = {
            "wins": wins,
            "ties": ties,
            "losses": len(mine) - wins - ties,
            "votes": len(mine),
            "win_rate": score / len(mine) if mine else None,
            "ci95": [low, high],
        }
    return out


def results(votes: list[dict], planned: int, damaged: int = 0) -> dict:
    """Win rates overall and per condition, skips, and the votes left for `planned` (counted votes:
    all but skips)."""
    models = sorted({v["left_model"] for v in votes} | {v["right_model"] for v in votes})
    overall = _tally(votes, models)
    conditions = sorted({v["condition"] for v in votes})
    return {
        "models": models,
        "overall": overall,
        "per_condition": {c: _tally([v for v in votes if v["condition"] == c], models) for c in conditions},
        "skips": sum(v["choice"] == "skip" for v in votes),
        "planned": planned,
        "remaining": max(0, planned - overall["votes"]),
        "damaged_lines": damaged,
        "left_shown": {m: sum(v["left_model"] == m for v in votes) for m in models},
    }
