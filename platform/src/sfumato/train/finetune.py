"""Post-training, part 1 (`sfumato finetune`): supervised fine-tuning of a trained model on a
curated subset of the manifest, in full or as LoRA adapters (sfumato.models.lora).

A fine-tune is an ordinary training run (Ray Train + DeepSpeed, checkpoints, exact resume,
metrics, grids, validation, report) whose config is the parent's with `finetune.overrides`
applied (its own output_dir, a lower learning rate, warm-up, fewer steps...), `finetune.lora`
as `train.lora`, and a `train.lineage` that says where it starts:

- its weights: the parent run's EMA weights at a committed checkpoint (`finetune.parent`,
  `finetune.checkpoint`), or a diffusers export folder / hub id of a model family sfumato trains
  (`finetune.pretrained`); the EMA restarts from them;
- its data: the manifest rows that `finetune.select` keeps, listed once in the run folder
  (selected_ids.txt); the loader reads the parent's shards and skips every other sample;
- what its labels and tokens mean: the parent's classes.json and, for a text model, the
  parent's (or the export's) tokenizer, copied into the run folder before any worker starts.

The lineage (parent, checkpoint and its step, the parent config's hash, the filter, the selected
row count) is resolved before any work and written into the run's config.yaml, so evaluation,
export, the report and the model card of the fine-tune all know it, and `sfumato train --resume`
continues a fine-tune like any run. The `finetune` section is the recipe; the run's own config
keeps what it produced (train.lineage, train.lora) and not the recipe.
"""

from __future__ import annotations

from pathlib import Path

from sfumato.config import Config, apply, content_hash, run_tree, validated
from sfumato.layout import DataFolder, RunFolder, atomic_write


def selected_rows(data_dir: Path, sel):
    """The manifest rows the select section (config.SelectConfig) keeps: every condition that is
    set must hold. A filter that keeps nothing is an error naming the key that emptied it."""
    import pandas as pd

    from sfumato.data.manifest import OK, read_manifest

    path = DataFolder(data_dir).manifest
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `sfumato ingest` (and shards) before a fine-tune")
    rows = read_manifest(path)
    rows = rows[rows["status"] == OK]  # only `ok` rows are in the shards
    steps: list[tuple[str, object]] = []
    if sel.ids is not None or sel.ids_file is not None:
        wanted = set(sel.ids or [])
        if sel.ids_file is not None:
            if not sel.ids_file.is_file():
                raise FileNotFoundError(f"finetune.select.ids_file: {sel.ids_file} does not exist")
            wanted |= {line.strip() for line in sel.ids_file.read_text().splitlines() if line.strip()}
        steps.append(
            ("finetune.select.ids" if sel.ids is not None else "finetune.select.ids_file", rows["id"].isin(wanted))
        )
    if sel.sources is not None:
        steps.append(("finetune.select.sources", rows["source"].isin(sel.sources)))
    if sel.tags is not None:
        wanted_tags = set(sel.tags)
        steps.append(("finetune.select.tags", rows["tags"].map(lambda tags: bool(wanted_tags & set(tags)))))
    if sel.caption_contains is not None:
        needle = sel.caption_contains.lower()
        steps.append(
            (
                "finetune.select.caption_contains",
                rows["caption"].fillna("").str.lower().str.contains(needle, regex=False),
            )
        )
    if sel.min_aesthetic is not None:
        if "aesthetic_score" not in rows:
            raise ValueError(
                f"finetune.select.min_aesthetic: {path} has no aesthetic_score column (set "
                "data.curate.safety.aesthetic_weights and run `sfumato safety`)"
            )
        steps.append(
            ("finetune.select.min_aesthetic", rows["aesthetic_score"].fillna(-float("inf")) >= sel.min_aesthetic)
        )
    keep = pd.Series(True, index=rows.index)
    for key, mask in steps:
        if not (keep & mask).any():
            raise ValueError(
                f"{key} leaves no row of {path} selected ({int(keep.sum())} ok rows before it): nothing to fine-tune on"
            )
        keep &= mask
    return rows[keep]


def run_config(
    cfg: Config, parent: Path | None = None, checkpoint: str | None = None, pretrained: str | None = None
) -> Config:
    """The fine-tune's own config: `cfg` (the parent run's config, or any config with a
    `finetune` section) with finetune.overrides applied, finetune.lora as train.lora and
    train.lineage resolved; the rows it selects are counted (none is an error, before any work).
    The command line's --from / --checkpoint / --pretrained take precedence over the section's.
    A fine-tune folder that already exists must have started from the same weights."""
    ft = cfg.finetune
    if ft is None:
        raise ValueError("the config has no `finetune` section (README: Post-training)")
    tree, lineage = start_from(cfg, ft, "finetune", parent, checkpoint, pretrained)
    lineage["select"] = ft.select.model_dump(mode="json", exclude_none=True)
    probe = validated(tree, "finetune.overrides applied to the run")
    lineage["selected_rows"] = len(selected_rows(probe.data.output_dir, ft.select))
    same_start(Path(tree["train"]["output_dir"]).resolve(), lineage)
    return validated(tree, "finetune.overrides applied to the run")


def start_from(
    cfg: Config, section, key: str, parent: Path | None, checkpoint: str | None, pretrained: str | None
) -> tuple[dict, dict]:
    """What every post-training run (finetune, align) resolves alike: the run's config tree (the
    section's overrides applied, section.lora as train.lora, train.lineage set to the returned
    lineage dict, which the caller completes) and where its weights come from."""
    from sfumato import checkpoint as ckpt
    from sfumato.models.run import resolve_checkpoint

    parent = parent or section.parent
    pretrained = pretrained or section.pretrained
    if parent is not None and pretrained is not None:
        raise ValueError(
            f"{key}: give either a parent run ({key}.parent, --from) or {key}.pretrained (--pretrained), not both"
        )
    if parent is None and pretrained is None:
        parent = cfg.train.output_dir  # the pipeline's own pre-training run
    lineage: dict = {}
    if parent is not None:
        run = RunFolder(parent).require()
        folder = resolve_checkpoint(run.root, checkpoint or section.checkpoint)
        lineage.update(
            parent=str(run.root.resolve()),
            checkpoint=folder.name,
            parent_step=ckpt.load_meta(folder)["step"],
            parent_config_sha256=content_hash(run.config.read_text()),
        )
    else:
        lineage["pretrained"] = pretrained
    tree = apply(run_tree(cfg), section.overrides)
    for recipe in ("finetune", "align"):
        tree.pop(recipe, None)
    out = Path(tree["train"]["output_dir"]).resolve()
    if parent is not None and out == Path(parent).resolve():
        raise ValueError(f"{key}.overrides must set train.output_dir to a folder of its own: {out} is the parent run's")
    lora = section.lora
    tree["train"]["lora"] = None if lora is None else lora.model_dump(mode="json", exclude={"learning_rate"})
    if lora is not None and lora.learning_rate is not None:
        tree["train"]["optimizer"] = {**tree["train"].get("optimizer", {}), "lr": lora.learning_rate}
    tree["train"]["lineage"] = lineage
    return tree, lineage


def same_start(out: Path, lineage: dict) -> None:
    """A post-training run folder resumes only from the weights (and data) it started from."""
    run = RunFolder(out)
    if not run.config.exists():
        return
    from sfumato.config import load_run_config

    before = load_run_config(out).train.lineage
    keys = ("parent", "checkpoint", "pretrained", "select", "pairs")
    if before is None or any(before.model_dump(mode="json").get(k) != lineage.get(k) for k in keys):
        was = None if before is None else {k: v for k, v in before.model_dump(mode="json").items() if k in keys and v}
        raise ValueError(
            f"{out} already holds a run started from {was}, not { ({k: lineage[k] for k in keys if lineage.get(k)}) }: "
            "give the fine-tune another train.output_dir (finetune.overrides), or the same parent and --checkpoint"
        )


def prepare(cfg: Config) -> None:
    """Before any worker starts (the first start only): the selected ids in the run folder, the
    parent's classes (the label -> index map the weights were trained with) and a text model's
    tokenizer (keep_tokenizer)."""
    run = RunFolder(cfg.train.output_dir)
    target = run.selected_ids
    if cfg.train.dpo is None and not target.exists():  # an alignment's data are its pairs
        from sfumato.config import SelectConfig

        ids = sorted(selected_rows(cfg.data.output_dir, SelectConfig(**cfg.train.lineage.select))["id"])
        atomic_write(target, "\n".join(ids) + "\n")
    lineage = cfg.train.lineage
    if cfg.train.conditioning == "text" and not run.tokenizer.exists():
        keep_tokenizer(lineage, run)
    if lineage.parent is not None and not run.classes.exists():
        source = RunFolder(lineage.parent).classes
        if source.exists():
            atomic_write(run.classes, source.read_text())
    shards = DataFolder(cfg.data.output_dir).shard_folder.classes
    if run.classes.exists() and shards.exists():
        import json

        if json.loads(run.classes.read_text()) != json.loads(shards.read_text()):
            raise ValueError(
                f"{shards} maps classes differently from the parent's {run.classes}: the shards "
                "were rebuilt with other tags; fine-tune on shards with the parent's classes"
            )


def keep_tokenizer(lineage, run: RunFolder) -> None:
    """A text model's token ids mean what they meant to the weights it starts from: the run
    folder gets the parent's tokenizer (or the diffusers export's `tokenizer/`), so the training
    never trains a new one on the manifest, which could split the same words into other ids
    (a rebuilt manifest, another train.text.vocab_size)."""
    import shutil

    tmp = run.tokenizer.with_name(run.tokenizer.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if lineage.parent is not None:
        source = RunFolder(lineage.parent).tokenizer
        if not source.is_dir():
            raise FileNotFoundError(f"{source} does not exist: the parent {lineage.parent} is not a text run")
        shutil.copytree(source, tmp)
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(lineage.pretrained, subfolder="tokenizer")
        except (OSError, ValueError) as err:
            raise ValueError(f"finetune.pretrained={lineage.pretrained!r}: no tokenizer/ to read: {err}") from None
        tokenizer.save_pretrained(tmp)
    tmp.replace(run.tokenizer)


def selected_ids(cfg: Config) -> frozenset[str]:
    """The ids a fine-tune trains and validates on (sfumato.train.tasks.FineTuning), listed by `prepare`."""
    path = RunFolder(cfg.train.output_dir).selected_ids
    return frozenset(line for line in path.read_text().splitlines() if line)
