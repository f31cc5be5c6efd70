"""Preferences -> Diffusion-DPO training pairs, and the pairs' loader.

`sfumato pairs` turns A/B test folders (their votes.jsonl and images/) and imported tables into
one pairs.parquet: a row per decided vote with its condition and the chosen and rejected images
(PNG bytes), so the table alone is the training data. Ties and skips are dropped and counted;
a damaged vote line is counted; a vote whose image is missing is an error naming it (nothing is
dropped silently). Imported tables come in Pick-a-Pic's layout (caption, jpg_0, jpg_1, label_0:
1 when image 0 won, 0.5 a tie) or in the pairs layout itself (condition, chosen, rejected).

`pair_batches` deals the training pairs the way the shard loader deals samples: an order drawn
from (seed, epoch), every rank a disjoint slice of it, a small JSON position that resumes it
exactly; a pair's fixed hash decides whether it is held out (the implicit reward accuracy is
measured on those).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sfumato.layout import commit_file, temporary_sibling


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("condition", pa.string()),
            ("chosen", pa.binary()),
            ("rejected", pa.binary()),
            ("origin", pa.string()),
        ]
    )


def _pair_id(condition: str, chosen: bytes, rejected: bytes) -> str:
    digest = hashlib.sha256()
    for part in (condition.encode(), hashlib.sha256(chosen).digest(), hashlib.sha256(rejected).digest()):
        digest.update(part)
    return digest.hexdigest()[:24]


def from_abtest(folder: Path) -> tuple[list[dict], dict]:
    """The decided votes of one A/B test folder as pairs, and the counts of what was dropped."""
    from sfumato.data.votes import read_votes

    folder = Path(folder)
    votes, damaged = read_votes(folder / "votes.jsonl")
    if not votes and not damaged:
        raise FileNotFoundError(f"{folder / 'votes.jsonl'} holds no vote")
    rows, counts = [], {"votes": len(votes), "ties": 0, "skips": 0, "damaged_lines": damaged}
    for vote in votes:
        if vote["choice"] in ("tie", "skip"):
            counts["ties" if vote["choice"] == "tie" else "skips"] += 1
            continue
        won, lost = ("left_image", "right_image") if vote["choice"] == "left" else ("right_image", "left_image")
        images = []
        for key in (won, lost):
            path = folder / "images" / f"{vote[key]}.png"
            if not path.is_file():
                raise FileNotFoundError(f"vote {vote['vote']} of {folder / 'votes.jsonl'}: its {key} {path} is missing")
            images.append(path.read_bytes())
        rows.append(
            {
                "id": _pair_id(vote["condition"], *images),
                "condition": vote["condition"],
                "chosen": images[0],
                "rejected": images[1],
                "origin": f"{folder}#{vote['vote']}",
            }
        )
    return rows, counts


def from_table(path: Path) -> tuple[list[dict], dict]:
    """An imported preferences table: Pick-a-Pic's layout or the pairs layout."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    names = set(table.column_names)
    rows, counts = [], {"votes": table.num_rows, "ties": 0, "skips": 0, "damaged_lines": 0}
    if {"condition", "chosen", "rejected"} <= names:
        for i, row in enumerate(table.select(["condition", "chosen", "rejected"]).to_pylist()):
            if not row["chosen"] or not row["rejected"]:
                raise ValueError(f"{path} row {i}: chosen and rejected must both hold image bytes")
            condition = row["condition"] or ""
            rows.append(
                {
                    "id": _pair_id(condition, row["chosen"], row["rejected"]),
                    "condition": condition,
                    "chosen": row["chosen"],
                    "rejected": row["rejected"],
                    "origin": f"{path}#{i}",
                }
            )
        return rows, counts
    need = {"caption", "jpg_0", "jpg_1", "label_0"}
    if not need <= names:
        raise ValueError(
            f"{path} is neither a pairs table (condition, chosen, rejected) nor in Pick-a-Pic's layout "
            f"(caption, jpg_0, jpg_1, label_0): it lacks {sorted(need - names)}"
        )
    for i, row in enumerate(table.select(sorted(need)).to_pylist()):
        label = row["label_0"]
        if label is None or not 0.0 <= float(label) <= 1.0:
            raise ValueError(f"{path} row {i}: label_0 {label!r} is not in [0, 1]")
        if float(label) == 0.5:
            counts["ties"] += 1
            continue
        chosen, rejected = (row["jpg_0"], row["jpg_1"]) if float(label) > 0.5 else (row["jpg_1"], row["jpg_0"])
        condition = row["caption"] or ""
        rows.append(
            {
                "id": _pair_id(condition, chosen, rejected),
                "condition": condition,
                "chosen": chosen,
                "rejected": rejected,
                "origin": f"{path}#{i}",
            }
        )
    return rows, counts


def run_pairs(sources: list[Path], out: Path) -> dict:
    """`sfumato pairs SOURCE... --out pairs.parquet`: every source's pairs in one table (written
    whole or not at all) and a summary beside it (out.summary.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, summary = [], {"sources": {}}
    for source in sources:
        source = Path(source)
        found, counts = from_abtest(source) if source.is_dir() else from_table(source)
        summary["sources"][str(source)] = {**counts, "pairs": len(found)}
        rows.extend(found)
    if not rows:
        raise ValueError(f"{[str(s) for s in sources]} hold no decided vote (ties and skips are no pairs)")
    total = {
        k: sum(c[k] for c in summary["sources"].values()) for k in ("votes", "ties", "skips", "damaged_lines", "pairs")
    }
    summary.update(total)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), tmp)
    commit_file(tmp, out)
    summary_path = out.with_name(out.name + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


# ------------------------------------------------------------------------------- training
class PairSet:
    """A pairs.parquet in memory (PNG bytes; decoded batch by batch)."""

    def __init__(self, path: Path, conditioning: str, classes: dict | None = None):
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: `sfumato pairs` writes it from A/B votes")
        table = pq.read_table(path)
        missing = [c for c in ("id", "condition", "chosen", "rejected") if c not in table.column_names]
        if missing:
            raise ValueError(f"{path} is not a pairs table: it lacks {missing} (`sfumato pairs` writes one)")
        self.path, self.conditioning = path, conditioning
        self.ids = table.column("id").to_pylist()
        self.conditions = table.column("condition").to_pylist()
        self.chosen = table.column("chosen").to_pylist()
        self.rejected = table.column("rejected").to_pylist()
        self.classes = None
        if conditioning == "class":
            unknown = [(i, c) for i, c in enumerate(self.conditions) if c not in (classes or {})]
            if unknown:
                i, c = unknown[0]
                raise ValueError(
                    f"{path} row {i}: condition {c!r} is not one of the model's classes {sorted(classes or {})}"
                )
            self.classes = [classes[c] for c in self.conditions]

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(training, held-out) row indices, by each pair's fixed hash position."""
        from sfumato.data.loader import split_position

        held = np.array([split_position(i) < holdout_fraction for i in self.ids], dtype=bool)
        return np.flatnonzero(~held), np.flatnonzero(held)

    def batch(self, rows, resolution_px: int) -> dict:
        """{"image": chosen uint8 [B,H,W,3], "rejected": the same, "class", "caption", "id"}."""
        return {
            "image": np.stack([_decode(self.chosen[r], resolution_px, self.path, r) for r in rows]),
            "rejected": np.stack([_decode(self.rejected[r], resolution_px, self.path, r) for r in rows]),
            "class": np.asarray([self.classes[r] if self.classes else -1 for r in rows], np.int64),
            "caption": [self.conditions[r] if self.conditioning == "text" else "" for r in rows],
            "id": [self.ids[r] for r in rows],
        }


def _decode(data: bytes, resolution_px: int, path: Path, row: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from sfumato.data.decode import cover_crop

    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} row {row}: an image that does not decode ({err})") from err
    if image.size != (resolution_px, resolution_px):
        image = cover_crop(image, resolution_px, resolution_px)
    return np.asarray(image)


def pair_batches(
    pairs: PairSet,
    rows: np.ndarray,
    batch_size: int,
    resolution_px: int,
    rank: int,
    world: int,
    seed: int,
    position: dict | None = None,
) -> Iterator[tuple[dict, dict]]:
    """(batch, position) without end: each epoch the training rows in an order drawn from (seed,
    epoch), rank r taking every world-th of them, in whole batches. `position` (from a checkpoint)
    continues exactly where that batch left off."""
    if len(rows) // world < batch_size:
        raise ValueError(
            f"{pairs.path}: {len(rows)} training pairs cannot fill a micro-batch of {batch_size} "
            f"on each of {world} worker(s): collect more votes or lower the micro-batch size"
        )
    epoch, start = (position["epoch"], position["next"]) if position else (0, 0)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(rows)[rank::world]
        for at in range(start, len(order) - batch_size + 1, batch_size):
            yield pairs.batch(order[at : at + batch_size], resolution_px), {"epoch": epoch, "next": at + batch_size}
        epoch, start = epoch + 1, 0
