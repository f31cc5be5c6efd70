"""Loading a config: a YAML file and dotted command-line overrides validated into the root Config,
a run folder's resolved config, and trees (a sweep's trials, a fine-tune's run) validated with
errors that name their dotted keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sfumato.config.base import ConfigError
from sfumato.config.root import Config
from sfumato.config.tree import _format_errors, apply_override, validate_as, validated_as
from sfumato.layout import RunFolder


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return parsed


def load_config(path: str | Path, overrides: list[str] | None = None, inputs: bool = True) -> Config:
    """inputs=False: the stage reads no data source (evaluate, report, export of a run folder), so
    source paths that no longer exist (a run folder copied off its cluster) are not errors."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        apply_override(tree, key, value)
    try:
        return validate_config(tree, inputs)
    except ValidationError as err:
        origin = f"{path}" + (f" with overrides {overrides}" if overrides else "")
        raise ConfigError(_format_errors(err, origin)) from None


def validate_config(tree: dict, inputs: bool | None = None) -> Config:
    """A Config from a tree (pydantic's ValidationError on bad values). inputs=False: as in
    load_config; what a Ray worker uses, since a source folder on the driver's machine need not
    exist on the worker's (workers read shards and run folders only). None: as the enclosing
    validation does (True outside any)."""
    return validate_as(Config, tree, inputs)


def validated(tree: dict, what: str, inputs: bool | None = None) -> Config:
    """A Config from `tree`; a problem becomes a ValueError naming `what` and the dotted keys."""
    return validated_as(Config, tree, what, inputs)


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """A run folder's resolved config (RunFolder.config) with optional overrides: what every
    stage after training (evaluate, export, report, serve, finetune) starts from. A folder
    without config.yaml, or a config without a train section, is not a run folder."""
    folder = RunFolder(run_dir).require()
    cfg = load_config(folder.config, overrides, inputs=False)
    if cfg.train is None:
        raise ConfigError(f"{folder.config} has no `train` section: it is not a training run's config")
    return cfg
