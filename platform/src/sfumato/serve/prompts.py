"""What a prompt must be to reach a text model, checked the same way by the Serve request schema
and the A/B page's conditions file.

A prompt is text (a JSON string, not a number or a list), holds something besides whitespace,
holds no control character (NUL, the C0 and C1 controls, DEL; tab and line breaks are
whitespace), fits the character cap, and fits the model's own tokenizer: the pipeline pads and
truncates every prompt to the length the text encoder was trained at (its start and end tokens
included), so a longer one would be cut silently and the image would not be of what was asked.
`PromptTokens` counts with the model's tokenizer, untruncated; the problems are said without
echoing the prompt (it may be huge, or not printable).
"""

from __future__ import annotations

import re
from pathlib import Path

MAX_PROMPT_CHARS = 500
"""The character cap of a prompt where nothing else sets one (Serve's `max_prompt_chars` default)."""

CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
"""Control characters a prompt may not hold: every C0 control but tab, LF and CR, DEL, the C1 controls."""


class PromptTokens:
    """How many tokens a prompt is for a text model, by its own tokenizer (the `tokenizers`
    library's, as the export keeps it), start and end tokens included and nothing cut off.
    Picklable: the Serve ingress carries one to its replica."""

    def __init__(self, tokenizer_json: str, max_tokens: int):
        from tokenizers import Tokenizer

        self.max_tokens = int(max_tokens)
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    @classmethod
    def from_file(cls, path: Path, max_tokens: int) -> PromptTokens:
        """A tokenizer.json: the ONNX export's, or a transformers fast tokenizer's folder file."""
        return cls(Path(path).read_text(), max_tokens)

    @classmethod
    def from_transformers(cls, tokenizer, max_tokens: int) -> PromptTokens:
        """A transformers fast tokenizer (the diffusers export's `tokenizer/`)."""
        return cls(tokenizer.backend_tokenizer.to_str(), max_tokens)

    def count(self, prompt: str) -> int:
        return len(self.tokenizer.encode(prompt).ids)


def prompt_problem(prompt: str, max_chars: int, tokens: PromptTokens | None, required: bool = True) -> str | None:
    """What is wrong with `prompt` (None: nothing). `required`: an empty prompt is a problem (a
    negative prompt may be empty: it means none)."""
    if not isinstance(prompt, str):
        return f"is not text (a {type(prompt).__name__})"
    if not prompt.strip():
        return "is empty (or only whitespace): say what the image should show" if required else None
    if len(prompt) > max_chars:
        return f"is {len(prompt)} characters long, more than the {max_chars} allowed"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (it holds a lone surrogate)"
    control = CONTROL.search(prompt)
    if control:
        return f"holds a control character (U+{ord(control.group()):04X}) at position {control.start()}"
    if tokens is not None:
        count = tokens.count(prompt)
        if count > tokens.max_tokens:
            return (
                f"is {count} tokens long (start and end tokens included); the model reads at most "
                f"{tokens.max_tokens}, so the rest would be cut off: shorten it"
            )
    return None
