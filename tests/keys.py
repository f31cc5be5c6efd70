"""Which config keys code reads: every field read on any config model while recording, by its
dotted path from the Config it hangs off (`data.shards.resolutions_px`).

It patches `Frozen.__getattribute__` (every config model's), so isinstance checks and the real
objects are untouched; reads made while a Config is validated or dumped are not counted (a
validator checks keys it does not use; writing the resolved config beside an output, or hashing
it, serialises every key, and pydantic's serialiser reads a union's tag through getattr). Reads in
other processes (Ray tasks and workers) are not seen: only what the driver reads.
"""

from __future__ import annotations

from contextlib import contextmanager

from pydantic import BaseModel

from sfumato import config as config_module


class KeyRecorder:
    def __init__(self):
        self.keys: set[str] = set()
        self._paths: dict[int, str] = {}  # id(model) -> its dotted path
        self._validating = 0
        self.active = False

    def _seen(self, model, name: str, value) -> None:
        if not self.active or self._validating or name.startswith("_") or name not in type(model).model_fields:
            return
        base = "" if isinstance(model, config_module.Config) else self._paths.get(id(model))
        if base is None:
            return  # a model not reached from a Config (built on its own): not a key of the tree
        path = f"{base}.{name}" if base else name
        self.keys.add(path)
        children = (
            [(path, value)]
            if isinstance(value, BaseModel)
            else [(f"{path}.{i}", v) for i, v in enumerate(value)]
            if isinstance(value, (list, tuple))
            else []
        )
        for child_path, child in children:
            if isinstance(child, BaseModel):
                self._paths[id(child)] = child_path

    @contextmanager
    def recording(self):
        self.keys.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False


@contextmanager
def key_recorder(monkeypatch):
    """A KeyRecorder wired into every config model for the duration."""
    recorder = KeyRecorder()
    original_validate = config_module.Config.model_validate.__func__
    original_dump = config_module.Frozen.model_dump

    def getattribute(model, name):
        value = object.__getattribute__(model, name)
        recorder._seen(model, name, value)
        return value

    def paused(call):
        """`call` with the recording paused (validating or dumping a config reads every key)."""

        def run(*args, **kwargs):
            recorder._validating += 1
            try:
                return call(*args, **kwargs)
            finally:
                recorder._validating -= 1

        return run

    model_validate, model_dump = paused(original_validate), paused(original_dump)

    monkeypatch.setattr(config_module.Frozen, "model_dump", model_dump)
    monkeypatch.setattr(config_module.Frozen, "__getattribute__", getattribute)
    monkeypatch.setattr(config_module.Config, "model_validate", classmethod(model_validate))
    yield recorder


def undeclared(read: set[str], declared: tuple[str, ...]) -> list[str]:
    """Keys read that no declared key covers: a declared key covers itself and everything under
    it, and reading a node on the way to one (`data` for `data.ingest`) is no read of its own."""

    def covered(key: str) -> bool:
        return any(key == d or key.startswith(d + ".") or d.startswith(key + ".") for d in declared)

    return sorted(k for k in read if not covered(k))
