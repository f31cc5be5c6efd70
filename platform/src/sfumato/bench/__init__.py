"""Benchmarks: each runs the project and a baseline on the same machine in one run."""

import json
from pathlib import Path


def add_out_argument(parser) -> None:
    """--out, which every bench takes (publish writes it)."""
    parser.add_argument("--out", default=None, help="write the figures as JSON here")


def add_datasets_argument(parser, holding: str) -> None:
    """--datasets: the folder of the shared real-image archives, relative to the working directory."""
    parser.add_argument("--datasets", default="../shared/datasets", help=f"the folder holding {holding}")


def add_repo_argument(parser, reads: str) -> None:
    """--repo: the repository checkout whose configs a bench starts from (not found through
    sfumato's install location, which need not be a checkout)."""
    parser.add_argument(
        "--repo", default=".", help=f"the sfumato repository, for {reads} (default: the working directory)"
    )


def checkout(repo: str, needs: str) -> Path:
    """The checkout --repo names, resolved; a clear error when the file it `needs` is not there."""
    root = Path(repo).resolve()
    if not (root / needs).exists():
        raise SystemExit(f"{root / needs} does not exist: run from the sfumato repository's root or pass --repo")
    return root


def publish(result: dict, text: str, out: str | None) -> dict:
    """Print a bench's table and, with --out, write its figures as JSON."""
    print(text)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def load_recipe(spec: str, repo: Path):
    """A race's recipe, 'configs/x.yaml,key=value,...' (paths relative to the repo) -> its config."""
    from sfumato.config import load_config

    path, *overrides = [p.strip() for p in spec.split(",") if p.strip()]
    return load_config(repo / path, overrides, inputs=False)
