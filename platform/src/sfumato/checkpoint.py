"""Atomic checkpoints in the run folder (RunFolder.checkpoints): checkpoints/step-NNNNNNNN/.

Every rank writes its part into `step-N.partial/` (DeepSpeed's sharded model and optimizer
states, its own RNG state); after a barrier rank 0 writes the EMA weights (safetensors) and
meta.json, then the COMMITTED marker, then renames the folder to `step-N`. Only folders with the
marker are ever loaded, so a checkpoint cut off by a crash is skipped, never read as whole.
Retention keeps the newest `num_to_keep` committed checkpoints and never deletes the last good one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the layout queries below need no torch; the weight files do (imported there)
    import torch

COMMITTED = "COMMITTED"
DEEPSPEED_TAG = "state"
EMA, META = "ema.safetensors", "meta.json"


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:08d}"


def partial_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:08d}.partial"


def committed(checkpoints: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    if not checkpoints.exists():
        return []
    found = [
        p
        for p in checkpoints.iterdir()
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / COMMITTED).exists()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest(checkpoints: Path) -> Path | None:
    done = committed(checkpoints)
    return done[-1] if done else None


def save_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    import torch
    from safetensors.torch import save_file

    save_file(
        {"generator": generator.get_state(), "torch": torch.get_rng_state()},
        str(folder / f"rng-rank{rank}.safetensors"),
    )


def load_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    import torch
    from safetensors.torch import load_file

    state = load_file(str(folder / f"rng-rank{rank}.safetensors"))
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])


def save_loader_position(folder: Path, rank: int, position: dict) -> None:
    (folder / f"data-rank{rank}.json").write_text(json.dumps(position))


def load_loader_position(folder: Path, rank: int) -> dict:
    return json.loads((folder / f"data-rank{rank}.json").read_text())


def load_meta(folder: Path) -> dict:
    """step, micro_step, model, time and the loss average (`LossAverage.state_dict`) of a checkpoint."""
    return json.loads((folder / META).read_text())


def ema_path(folder: Path) -> Path:
    """The checkpoint's EMA weights (safetensors): what evaluation, export and serving load."""
    return Path(folder) / EMA


def load_ema(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ema_path(folder)))


def commit(checkpoints: Path, step: int, ema_state: dict[str, torch.Tensor], meta: dict, num_to_keep: int) -> Path:
    """Rank 0, after every rank has written its part: EMA + meta, marker, rename, retention."""
    from safetensors.torch import save_file

    work = partial_dir(checkpoints, step)
    save_file(ema_state, str(work / EMA))
    (work / META).write_text(json.dumps(meta, indent=1))
    with open(work / COMMITTED, "w") as fh:
        fh.write(str(step))
        fh.flush()
        os.fsync(fh.fileno())
    final = step_dir(checkpoints, step)
    if final.exists():  # the same step written again after a restart: replace it whole
        shutil.rmtree(final)
    os.replace(work, final)
    for old in committed(checkpoints)[:-num_to_keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_partials(checkpoints: Path) -> None:
    """Leftovers of a write that a crash cut off (rank 0, at start)."""
    if checkpoints.exists():
        for p in checkpoints.glob("step-*.partial"):
            shutil.rmtree(p, ignore_errors=True)


def discard_after(checkpoints: Path, step: int) -> None:
    """Committed checkpoints past `step` (rank 0, after a rollback to `step`): they hold the
    abandoned spike's weights, and a restart must not resume from them."""
    for p in committed(checkpoints):
        if int(p.name[5:]) > step:
            (p / COMMITTED).unlink()  # first: a deletion cut off by a crash leaves no checkpoint to load
            shutil.rmtree(p)
