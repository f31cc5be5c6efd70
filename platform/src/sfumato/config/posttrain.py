"""The `finetune` and `align` sections (post-training: supervised fine-tuning and Diffusion-DPO of
a trained model) and what they resolve into in the run they start: train.lora, train.lineage,
train.dpo."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_serializer, model_validator

from sfumato.config.base import Frozen, _absolute


class SelectConfig(Frozen):
    """finetune.select: the manifest rows a fine-tune trains and validates on. Every key that is
    set must hold; only `ok` rows are in the shards, so only they can be selected. A filter that
    selects nothing is an error naming its key, before any work."""

    tags: list[str] | None = Field(None, min_length=1)
    """Rows with any of these tags (a sample's class is its innermost tag)."""
    sources: list[str] | None = Field(None, min_length=1)
    """Rows of these data.sources names."""
    caption_contains: str | None = Field(None, min_length=1)
    """Rows whose caption contains this text, case-insensitive ("on a blue background")."""
    min_aesthetic: float | None = None
    """Rows whose aesthetic_score (data.curate.safety.aesthetic_weights) is at least this."""
    ids: list[str] | None = Field(None, min_length=1)
    """An explicit list of manifest ids (with ids_file: both lists)."""
    ids_file: Path | None = None
    """A text file of manifest ids, one a line."""

    @field_validator("ids_file")
    @classmethod
    def _abs(cls, value: Path | None) -> Path | None:
        return None if value is None else _absolute(value)


class LoraSection(Frozen):
    """LoRA adapters (peft) instead of full fine-tuning: only their weights train, go into the
    optimizer, the EMA and the checkpoints; `sfumato export` writes the adapter alone (diffusers'
    LoRA format) and the merged model."""

    rank: int = Field(8, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0)
    """The adapter's update is scaled by alpha / rank; None: alpha = rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, min_length=1)
    """peft target names (module names or their last components, e.g. [to_q, to_k, to_v, to_out.0]);
    None: every linear layer of the network (attention, feed-forward, time and class embeddings)."""
    conv: bool = False
    """With target_modules None: the convolutions too (all but the first and the last)."""
    text_encoder: bool = False
    """Text models: adapters on the text encoder's attention too."""
    learning_rate: float | None = Field(None, gt=0)
    """finetune.lora only: the fine-tune's train.optimizer.lr when it trains adapters (they want a
    higher rate than full weights: a rank-r update starts at zero and moves through a small
    subspace; kohya and diffusers' LoRA scripts use ~10x the full fine-tuning rate). None: the rate
    the overrides give. Resolved into train.optimizer.lr; the run's train.lora keeps None."""


class LineageConfig(Frozen):
    """train.lineage: where a post-training run starts. Set by `sfumato finetune` (resolved from the
    finetune section), never by hand; None: a run from fresh weights."""

    parent: Path | None = None
    """The parent run folder whose EMA weights the run starts from."""
    checkpoint: str | None = None
    parent_step: int | None = None
    parent_config_sha256: str | None = None
    pretrained: str | None = None
    """Or: a diffusers folder or hub id of a model family sfumato trains."""
    select: dict[str, Any] = {}
    """The finetune.select filter the run's data came from (selected_ids.txt in the run folder)."""
    selected_rows: int = Field(0, ge=0)
    """Rows the filter selected (0: an alignment, whose data are its pairs)."""
    pairs: Path | None = None
    """An alignment's preference pairs (align.pairs) and their SHA-256."""
    pairs_sha256: str | None = None
    pair_count: int | None = None

    @model_validator(mode="after")
    def _one_start(self) -> LineageConfig:
        if (self.parent is None) == (self.pretrained is None):
            raise ValueError("a lineage starts from exactly one of parent and pretrained")
        return self


class PostTrainingConfig(Frozen):
    """What a fine-tune and an alignment share: the weights they start from, LoRA or full
    training, and the overrides that make their run. Either is the run of this config with
    `overrides` applied (dotted keys, like tune.proxy): its own output_dir, learning rate, warm-up,
    steps; the EMA restarts from the starting weights."""

    section: ClassVar[str]
    """The config section (finetune, align): errors name its keys."""
    run: ClassVar[str]
    """What the section's run is called in errors (the fine-tune, the alignment)."""

    parent: Path | None = None
    """A run folder to start from (its EMA weights; for an alignment, a fine-tune's, for the
    SFT -> DPO order); None (and no pretrained): train.output_dir, the run this config trains."""
    checkpoint: str | None = None
    """The parent's checkpoint, e.g. step-00001200; None: its newest."""
    pretrained: str | None = None
    """Instead of a parent: a diffusers folder (an `sfumato export`) or hub id of a model family
    sfumato trains."""
    lora: LoraSection | None = None
    """None: every weight trains (full fine-tuning)."""
    overrides: dict[str, Any] = Field(min_length=1)
    """Dotted keys applied to this config for the post-training run; train.output_dir is required."""

    @field_validator("parent")
    @classmethod
    def _abs(cls, value: Path | None) -> Path | None:
        return None if value is None else _absolute(value)

    @model_validator(mode="after")
    def _own_folder(self) -> PostTrainingConfig:
        if "train.output_dir" not in self.overrides:
            raise ValueError(f"{self.section}.overrides must set train.output_dir (the {self.run}'s own run folder)")
        if self.parent is not None and self.pretrained is not None:
            raise ValueError(f"give {self.section}.parent or {self.section}.pretrained, not both")
        return self

    @model_serializer(mode="wrap")
    def _shared_keys_last(self, handler) -> dict[str, Any]:
        """Dumped with lora and overrides last, after the section's own keys, as the sections are
        written (the fields of a subclass come after its base's)."""
        dumped = handler(self)
        last = {key: dumped.pop(key) for key in ("lora", "overrides") if key in dumped}
        return dumped | last


class FinetuneConfig(PostTrainingConfig):
    """`sfumato finetune` (and the pipeline's finetune stage): supervised fine-tuning of a trained
    model on a selected subset, fully or with LoRA."""

    section: ClassVar[str] = "finetune"
    run: ClassVar[str] = "fine-tune"

    select: SelectConfig = SelectConfig()


class AlignConfig(PostTrainingConfig):
    """`sfumato align` (and the pipeline's align stage): Diffusion-DPO (Wallace et al. 2023) of a
    trained model on preference pairs (`sfumato pairs` writes them from A/B votes), against a
    frozen reference copy of the starting weights, fully or with LoRA."""

    section: ClassVar[str] = "align"
    run: ClassVar[str] = "alignment"

    pairs: Path
    """A pairs table (sfumato.data.pairs: id, condition, chosen, rejected)."""
    beta: float = Field(2000.0, gt=0)
    """The KL penalty's strength against the reference, on per-pixel mean errors (diffusers'
    SD1.5 example: 2500; larger keeps the policy closer to the reference)."""
    holdout_fraction: float = Field(0.1, ge=0, lt=1)
    """Pairs held out (by a hash of their id) to measure the implicit reward accuracy on."""

    @field_validator("pairs")
    @classmethod
    def _pairs_abs(cls, value: Path) -> Path:
        return _absolute(value)


class DPOConfig(Frozen):
    """train.dpo: the run trains on preference pairs with the Diffusion-DPO loss (set from the
    align section by `sfumato align`, never by hand)."""

    pairs: Path
    beta: float = Field(gt=0)
    holdout_fraction: float = Field(0.1, ge=0, lt=1)
