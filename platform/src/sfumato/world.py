"""The words of the demo's compositional world (sfumato.data.scenes): its colours, shapes, counts
and relations, and the parser of held-out combinations. No dependencies, so the config can
validate `data.sources[].held_out` with it on any install."""

from __future__ import annotations

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUND = (235, 235, 235)
SHAPES = ("circle", "square", "triangle", "star")
NUMBERS = {2: "two", 3: "three", 4: "four"}
WORD_NUMBERS = {word: n for n, word in NUMBERS.items()}
RELATIONS = ("left of", "right of", "above", "below")


def parse_held_out(entry: str) -> tuple[str, str, int | None]:
    """'purple star' -> ('colour', 'purple', 'star'); 'three squares' -> ('count', 'square', 3).
    Raises ValueError naming what is wrong and the words it accepts."""
    words = entry.strip().lower().split()
    if len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES:
        return ("colour", words[0], words[1])  # type: ignore[return-value]
    if len(words) == 2 and words[0] in WORD_NUMBERS and words[1].rstrip("s") in SHAPES:
        return ("count", words[1].rstrip("s"), WORD_NUMBERS[words[0]])
    raise ValueError(
        f"{entry!r} is not a held-out combination: write a colour and a shape ('purple star'; colours "
        f"{list(COLOURS)}, shapes {list(SHAPES)}) or a count and a shape "
        f"('three squares'; counts {list(NUMBERS.values())})"
    )
