"""The A/B test's vote log, results and the DPO pairs the votes become (no model needed)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sfumato.data.pairs import PairSet, from_abtest, pair_batches, run_pairs
from sfumato.data.votes import VoteLog, read_votes, results, votes_table, wilson_interval, winner


def _png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _vote(
    n: int,
    choice: str,
    condition: str = "cat",
    left: str = "a",
    right: str = "b",
    left_image: str = "l",
    right_image: str = "r",
) -> dict:
    return {
        "vote": f"v{n}",
        "time": 1.0 + n,
        "rater": "ann",
        "trial": f"t{n}",
        "condition": condition,
        "seed_left": n,
        "seed_right": n,
        "left_model": left,
        "right_model": right,
        "left_image": left_image,
        "right_image": right_image,
        "choice": choice,
        "winner": winner(choice, left, right),
    }


def test_a_cut_off_last_line_is_counted_not_read_and_the_next_vote_is_whole(tmp_path):
    path = tmp_path / "votes.jsonl"
    log = VoteLog(path)
    log.append(_vote(1, "left"))
    log.append(_vote(2, "right"))
    with open(path, "ab") as fh:  # what a kill in the middle of a write leaves
        fh.write(json.dumps(_vote(3, "tie")).encode()[:40])
    votes, damaged = read_votes(path)
    assert [v["vote"] for v in votes] == ["v1", "v2"] and damaged == 1
    VoteLog(path).append(_vote(4, "skip"))  # a restarted server goes on writing
    votes, damaged = read_votes(path)
    assert [v["vote"] for v in votes] == ["v1", "v2", "v4"] and damaged == 1


WRITER = """
import sys
from sfumato.data.votes import VoteLog, winner
log = VoteLog(sys.argv[1])
n = 0
while True:
    n += 1
    log.append({"vote": f"v{n}", "time": float(n), "rater": "r", "trial": "t", "condition": "c" * 2000,
                "seed_left": n, "seed_right": n, "left_model": "a", "right_model": "b", "left_image": "x",
                "right_image": "y", "choice": "left", "winner": "a"})
    print(n, flush=True)
"""


def test_votes_acknowledged_before_a_sigkill_are_all_read_back(tmp_path):
    """A writer killed at a random moment: every vote it reported as written is read back whole."""
    path = tmp_path / "votes.jsonl"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    acknowledged = 0
    deadline = time.time() + 60
    while acknowledged < 50 and time.time() < deadline:
        acknowledged = int(writer.stdout.readline())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    rest = writer.stdout.read().split()
    acknowledged = int(rest[-1]) if rest else acknowledged
    votes, damaged = read_votes(path)
    assert acknowledged >= 50
    assert len(votes) >= acknowledged and damaged <= 1
    assert [v["vote"] for v in votes] == [f"v{n}" for n in range(1, len(votes) + 1)]


def test_wilson_interval_and_win_rates_with_ties_as_half():
    low, high = wilson_interval(65, 100)
    assert low == pytest.approx(0.5525, abs=1e-3) and high == pytest.approx(0.7364, abs=1e-3)
    votes = [
        _vote(1, "left"),
        _vote(2, "left", condition="dog"),
        _vote(3, "tie"),
        _vote(4, "right"),
        _vote(5, "skip"),
        _vote(6, "left", left="b", right="a"),
    ]  # b on the left wins once
    found = results(votes, planned=10)
    a, b = found["overall"]["models"]["a"], found["overall"]["models"]["b"]
    assert found["overall"]["votes"] == 5 and found["skips"] == 1 and found["remaining"] == 5
    assert (a["wins"], a["ties"], a["losses"]) == (2, 1, 2) and a["win_rate"] == pytest.approx(2.5 / 5)
    assert b["win_rate"] == pytest.approx(2.5 / 5)
    assert found["per_condition"]["dog"]["models"]["a"]["win_rate"] == 1.0
    assert found["left_shown"] == {"a": 5, "b": 1}
    table = votes_table(votes)
    assert table.num_rows == 6 and table.column("winner").to_pylist()[3] == "b"


def _abtest_folder(tmp_path, choices):
    folder = tmp_path / "ab"
    (folder / "images").mkdir(parents=True)
    log = VoteLog(folder / "votes.jsonl")
    import hashlib

    for n, choice in enumerate(choices):
        left, right = _png(10 * n), _png(10 * n + 5)
        hashes = []
        for data in (left, right):
            digest = hashlib.sha256(data).hexdigest()
            (folder / "images" / f"{digest}.png").write_bytes(data)
            hashes.append(digest)
        log.append(_vote(n, choice, condition=["cat", "dog"][n % 2], left_image=hashes[0], right_image=hashes[1]))
    return folder


def test_votes_become_pairs_with_ties_and_skips_dropped_and_counted(tmp_path):
    folder = _abtest_folder(tmp_path, ["left", "right", "tie", "skip", "left"])
    summary = run_pairs([folder], tmp_path / "pairs.parquet")
    assert (summary["votes"], summary["pairs"], summary["ties"], summary["skips"]) == (5, 3, 1, 1)
    table = pq.read_table(tmp_path / "pairs.parquet").to_pylist()
    first, second = table[0], table[1]
    assert first["chosen"] == _png(0) and first["rejected"] == _png(5)  # vote 0: left won
    assert second["chosen"] == _png(15) and second["rejected"] == _png(10)  # vote 1: right won
    assert [r["condition"] for r in table] == ["cat", "dog", "cat"]


def test_a_vote_whose_image_is_missing_is_an_error_naming_it(tmp_path):
    folder = _abtest_folder(tmp_path, ["left"])
    for image in (folder / "images").iterdir():
        image.unlink()
    with pytest.raises(FileNotFoundError, match="vote v0 .*left_image"):
        from_abtest(folder)


def test_a_pick_a_pic_table_imports_with_its_labels(tmp_path):
    path = tmp_path / "pickapic.parquet"
    pq.write_table(
        pa.table(
            {
                "caption": ["a", "b", "c"],
                "jpg_0": [_png(1), _png(2), _png(3)],
                "jpg_1": [_png(101), _png(102), _png(103)],
                "label_0": [1.0, 0.0, 0.5],
            }
        ),
        path,
    )
    summary = run_pairs([path], tmp_path / "pairs.parquet")
    assert (summary["pairs"], summary["ties"]) == (2, 1)
    rows = pq.read_table(tmp_path / "pairs.parquet").to_pylist()
    assert rows[0]["chosen"] == _png(1) and rows[1]["chosen"] == _png(102)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [_png(1)]}), bad)
    with pytest.raises(ValueError, match="lacks .*jpg_1"):
        run_pairs([bad], tmp_path / "out.parquet")


def test_pair_batches_are_disjoint_across_ranks_cover_each_pair_and_resume_exactly(tmp_path):
    folder = _abtest_folder(tmp_path, ["left", "right"] * 12)
    run_pairs([folder], tmp_path / "pairs.parquet")
    pairs = PairSet(tmp_path / "pairs.parquet", "class", {"cat": 0, "dog": 1})
    rows, held = pairs.split(0.0)
    assert len(rows) == 24 and len(held) == 0
    per_rank = []
    for rank in range(2):
        batches = pair_batches(pairs, rows, 4, 8, rank, 2, seed=7)
        per_rank.append([i for _ in range(3) for i in next(batches)[0]["id"]])  # one epoch: 12 pairs a rank
    assert not set(per_rank[0]) & set(per_rank[1]) and len(set(per_rank[0]) | set(per_rank[1])) == 24
    straight = pair_batches(pairs, rows, 4, 8, 0, 1, seed=3)
    seen = [next(straight) for _ in range(8)]  # into the second epoch
    resumed = pair_batches(pairs, rows, 4, 8, 0, 1, seed=3, position=seen[4][1])
    for (expected, _), (batch, _) in zip(seen[5:], (next(resumed) for _ in range(3))):
        assert batch["id"] == expected["id"]
        assert np.array_equal(batch["rejected"], expected["rejected"])
    batch = seen[0][0]
    assert batch["image"].shape == (4, 8, 8, 3) and set(batch["class"]) <= {0, 1}
    with pytest.raises(ValueError, match="condition 'dog' is not one of the model's classes"):
        PairSet(tmp_path / "pairs.parquet", "class", {"cat": 0})
