"""The config as a plain tree: dotted overrides on it, its validation against a schema with errors
phrased by dotted key, the dump of a config back to a tree (YAML, the resolved config a run
writes), and a stable hash of trees. Nothing here knows the root Config, so the tune section's
checks can use it (sfumato.config.loading binds it to the root)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sfumato.config.base import _CHECK_INPUT_PATHS, ConfigError
from sfumato.config.data import SOURCE_KINDS
from sfumato.layout import atomic_write


def _dotted(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        # Drop pydantic's union tag ("sources.0.folder.path" -> "sources.0.path").
        if item in SOURCE_KINDS and i > 0 and isinstance(loc[i - 1], int):
            continue
        parts.append(str(item))
    return ".".join(parts)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {_dotted(e['loc']) or '<root>'}: {msg}")
    return "\n".join(lines)


def _split_key(node: Any, keys: list[str], depth: int) -> int:
    """How many dotted parts the key at `node` takes: more than one where the mapping holds a key
    with dots in it (tune.search_space.train.optimizer.lr names one entry)."""
    if isinstance(node, dict):
        for end in range(len(keys), depth + 1, -1):
            if ".".join(keys[depth:end]) in node:
                return end - depth
    return 1


def apply_override(tree: dict, dotted_key: str, value: Any) -> None:
    """Set `a.b.c=value` in a nested dict; list items are addressed by index (`sources.0`), and
    keys that hold dots themselves (search space entries) are matched whole."""
    keys = dotted_key.split(".")
    node: Any = tree
    depth = 0
    while True:
        width = _split_key(node, keys, depth)
        key, where = ".".join(keys[depth : depth + width]), ".".join(keys[: depth + width])
        if depth + width == len(keys):
            break
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {dotted_key}: {where} is not an item of the list")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted_key}: {where} is a value, not a section")
        depth += width
    if isinstance(node, list):
        if not key.isdigit() or int(key) >= len(node):
            raise ConfigError(f"override {dotted_key}: no list item {key}")
        node[int(key)] = value
    else:
        node[key] = value


def validate_as(schema: type[BaseModel], tree: dict, inputs: bool | None = None):
    """A `schema` model from a tree (pydantic's ValidationError on bad values), with input paths
    checked or not as `inputs` says (sfumato.config.loading.validate_config)."""
    token = _CHECK_INPUT_PATHS.set(_CHECK_INPUT_PATHS.get() if inputs is None else inputs)
    try:
        return schema.model_validate(tree)
    finally:
        _CHECK_INPUT_PATHS.reset(token)


def validated_as(schema: type[BaseModel], tree: dict, what: str, inputs: bool | None = None):
    """A `schema` model from `tree`; a problem becomes a ValueError naming `what` and the dotted keys."""
    try:
        return validate_as(schema, tree, inputs)
    except ValidationError as err:
        raise ValueError(_format_errors(err, what)) from None


def to_dict(config: BaseModel) -> dict:
    return config.model_dump(mode="json")


def dump_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def write_resolved(config: BaseModel, path: Path) -> Path:
    """Write the resolved config next to a stage's outputs (atomically)."""
    return atomic_write(path, dump_yaml(config))


def content_hash(*parts: Any) -> str:
    """A stable short hash of JSON-able parts (configs as dicts, lists of ids...)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
