"""What every config section shares: the frozen model they derive from, the error a config problem
raises, and how paths are made absolute (and input paths checked) at load."""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config problem, phrased with the dotted key (and file) that caused it."""


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(os.path.abspath(os.path.expanduser(path)))


_CHECK_INPUT_PATHS: ContextVar[bool] = ContextVar("check_input_paths", default=True)


def _existing(path: Path | None, what: str) -> Path | None:
    """Absolute `path`, checked to be an existing folder, file or either (`what`), unless the
    config is a finished run's, loaded for its outputs (`load_config(..., inputs=False)`)."""
    path = _absolute(path)
    checks = {"folder": Path.is_dir, "file": Path.is_file, "path": Path.exists}
    if path is not None and _CHECK_INPUT_PATHS.get() and not checks[what](path):
        raise ValueError(f"{what} {path} does not exist")
    return path
